"""The `cxrjax` command: thin argument parsing that calls into the library.

Each subcommand has one `_add_<name>` function that declares its arguments and binds
the library call it runs. Heavy imports (jax, tensorflow protos) happen inside the
bound function so `cxrjax --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _add_synth(sub) -> None:
    p = sub.add_parser("synth", help="write a synthetic dataset in the NIH download layout")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--patients", type=int, default=400)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)

    def run(args):
        from cxrjax.data.synth import write_synthetic_nih

        summary = write_synthetic_nih(
            args.out, num_patients=args.patients, image_size=args.image_size, seed=args.seed
        )
        print(summary)

    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cxrjax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_synth,):
        add(sub)
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
