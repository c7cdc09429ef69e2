"""Saved activations per image (what the backward pass keeps) for each remat mode, against
the memory-efficient DenseNet's floor. Counted from shapes, so it runs on any machine in
seconds per case and the figures hold for every backend:

    python benchmarks/saved_activations.py --out benchmarks/results/cpu
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import sys
import time
from pathlib import Path

from cxrjax.bench.device import library_versions
from cxrjax.bench.memory import MIB
from cxrjax.models import build_model, default_model_config
from cxrjax.models.densenet import REMAT_MODES, arch_spec, saved_activation_floor
from cxrjax.models.memory import saved_activation_bytes_per_image


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="writes saved_activations.json and .md here")
    parser.add_argument("--arch", default="densenet121")
    parser.add_argument("--sizes", default="224,512,1024", help="image sizes, comma-separated")
    parser.add_argument("--dtype", default="bfloat16", help="float32 | bfloat16")
    parser.add_argument(
        "--torch",
        action="store_true",
        help="also torchvision's densenet (plain and memory_efficient=True): what autograd keeps, on the CPU",
    )
    parser.add_argument("--remat", default=",".join(REMAT_MODES), help="cxrjax remat modes, comma-separated")
    args = parser.parse_args(argv)
    itemsize = {"float32": 4, "bfloat16": 2}[args.dtype]
    rows = []
    for size in (int(v) for v in args.sizes.split(",")):
        floor = saved_activation_floor(arch_spec(args.arch), size, 3, itemsize)
        for remat in args.remat.split(","):
            cfg = default_model_config()
            cfg.update({"arch": args.arch, "cbam": True, "dtype": args.dtype, "remat": remat})
            start = time.perf_counter()
            saved = saved_activation_bytes_per_image(build_model(cfg), size)
            rows.append(
                {
                    "size": size,
                    "remat": remat,
                    "saved_bytes_per_image": saved,
                    "floor_bytes_per_image": floor,
                    "times_floor": saved / floor,
                    "traced_s": time.perf_counter() - start,
                }
            )
            print(f"{size} px remat {remat}: {saved / MIB:.1f} MiB/image ({saved / floor:.2f}x the floor)")
    torch_rows = []
    if args.torch:
        from cxrjax.bench.peers import torch_saved_activation_bytes_per_image

        for size in (int(v) for v in args.sizes.split(",")):
            for efficient in (False, True):
                saved = torch_saved_activation_bytes_per_image(args.arch, size, args.dtype, efficient)
                torch_rows.append({"size": size, "memory_efficient": efficient, "saved_bytes_per_image": saved})
                print(f"torchvision {size} px memory_efficient={efficient}: {saved / MIB:.1f} MiB/image")
    command = shlex.join(["python", "benchmarks/saved_activations.py", *(sys.argv[1:] if argv is None else argv)])
    meta = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": command,
        "model": f"{args.arch} + CBAM, chexnet head, {args.dtype} compute, 3-channel input",
        "host": platform.platform(),
        "python": platform.python_version(),
        "versions": library_versions(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "saved_activations.json").write_text(
        json.dumps({"meta": meta, "rows": rows, "torch_rows": torch_rows}, indent=1) + "\n"
    )
    lines = [
        f"# Saved activations per image: {meta['model']}",
        "",
        f"- date: {meta['date']}",
        f"- command: `{command}`",
        f"- versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}",
        "- what: bytes of the residuals `jax.vjp` keeps for the parameter gradient of a training-mode forward, "
        "per image (batch 2 minus batch 1), counted from shapes; the floor keeps only the image, each block's "
        "input, each layer's output and the final feature map (cxrjax.models.densenet.saved_activation_floor)",
        "",
        "| px | remat | MiB/image | floor MiB/image | × floor |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['size']} | {r['remat']} | {r['saved_bytes_per_image'] / MIB:.1f} | "
        f"{r['floor_bytes_per_image'] / MIB:.1f} | {r['times_floor']:.2f} |"
        for r in rows
    ]
    if torch_rows:
        lines += [
            "",
            f"torchvision's densenet ({args.arch}, no CBAM, channels_last, {args.dtype} autocast, on the CPU): every "
            "storage autograd saves outside the checkpointed bottlenecks plus each dense layer's output, parameters "
            "excluded, batch 2 minus batch 1. A lower bound of torch's peak memory per image.",
            "",
            "| px | memory_efficient | MiB/image |",
            "|---|---|---|",
        ]
        lines += [
            f"| {r['size']} | {r['memory_efficient']} | {r['saved_bytes_per_image'] / MIB:.1f} |" for r in torch_rows
        ]
    (args.out / "saved_activations.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
