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


def _fractions(text: str) -> tuple[float, float, float]:
    parts = tuple(float(v) for v in text.split(","))
    if len(parts) != 3:
        raise argparse.ArgumentTypeError("give three fractions: train,val,test")
    return parts


def _add_prepare(sub) -> None:
    from cxrjax.data.prepare import PrepareOptions

    d = PrepareOptions(image_size=0)
    p = sub.add_parser("prepare", help="convert an NIH download into sharded TFRecords")
    p.add_argument("--nih-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--image-size", type=int, required=True)
    p.add_argument("--split", choices=("official", "chexnet", "random"), default=d.split)
    p.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help="official split: patient-wise share of train_val kept for validation")
    p.add_argument("--fractions", type=_fractions, default=d.fractions,
                   help="random split: train,val,test fractions")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--source-size", type=int, default=d.source_size,
                   help="expected size of every source PNG (0: any square size)")
    p.add_argument("--records-per-shard", type=int, default=d.records_per_shard)
    p.add_argument("--workers", type=int, default=d.workers)
    p.add_argument("--labels", type=Path, default=None, help="a Data_Entry CSV to use instead")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip missing or unreadable images and list them in the manifest")

    def run(args):
        from cxrjax.data.prepare import prepare

        opts = PrepareOptions(
            image_size=args.image_size, split=args.split, val_fraction=args.val_fraction,
            fractions=args.fractions, seed=args.seed, source_size=args.source_size,
            records_per_shard=args.records_per_shard, workers=args.workers,
            skip_bad=args.skip_bad, labels=str(args.labels) if args.labels else None,
        )
        manifest = prepare(args.nih_dir, args.out, opts)
        counts = ", ".join(f"{k} {v['images']}" for k, v in manifest["parts"].items())
        print(f"prepared {counts} images at {args.image_size}px in {args.out}"
              f" ({manifest['skipped']['count']} skipped)")

    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cxrjax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_synth, _add_prepare):
        add(sub)
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
