"""The `cxrjax` command: thin argument parsing that calls into the library.

Each subcommand has one `_add_<name>` function that declares its arguments and binds
the library call it runs. Heavy imports (jax, tensorflow protos) happen inside the
bound function so `cxrjax --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cxrjax.logs import show_library_logs


def _add_synth(sub) -> None:
    p = sub.add_parser("synth", help="write a synthetic dataset in the NIH download layout")
    p.add_argument("--out", type=Path, required=True, help="new folder for the dataset (NIH download layout)")
    p.add_argument("--patients", type=int, default=400, help="patients to draw (1-6 follow-up images each)")
    p.add_argument("--image-size", type=int, default=128, help="side of the square PNGs in pixels")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed writes the same files")

    def run(args):
        from cxrjax.data.synth import write_synthetic_nih

        summary = write_synthetic_nih(args.out, num_patients=args.patients, image_size=args.image_size, seed=args.seed)
        print(summary)

    p.set_defaults(func=_input_errors_to_exit(run))


def _fractions(text: str) -> tuple[float, float, float]:
    parts = tuple(float(v) for v in text.split(","))
    if len(parts) != 3:
        raise argparse.ArgumentTypeError("give three fractions: train,val,test")
    return parts


def _add_prepare(sub) -> None:
    from cxrjax.data.options import PrepareOptions

    d = PrepareOptions(image_size=0)
    p = sub.add_parser("prepare", help="convert an NIH download into sharded TFRecords")
    p.add_argument(
        "--nih-dir",
        type=Path,
        required=True,
        help="the NIH download (images_*/images/*.png, Data_Entry_2017*.csv, split lists)",
    )
    p.add_argument("--out", type=Path, required=True, help="output folder; rerunning resumes and verifies it")
    p.add_argument("--image-size", type=int, required=True, help="side the images are resized to, e.g. 224 or 1024")
    p.add_argument(
        "--split",
        choices=("official", "chexnet", "random"),
        default=d.split,
        help="official: NIH train_val/test lists; chexnet: the CheXNet lists; random: patient-wise --fractions",
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=d.val_fraction,
        help="official split: patient-wise share of train_val kept for validation",
    )
    p.add_argument("--fractions", type=_fractions, default=d.fractions, help="random split: train,val,test fractions")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the patient-wise val carve-out or random split")
    p.add_argument(
        "--source-size", type=int, default=d.source_size, help="expected size of every source PNG (0: any square size)"
    )
    p.add_argument("--records-per-shard", type=int, default=d.records_per_shard, help="images per TFRecord shard")
    p.add_argument("--workers", type=int, default=d.workers, help="decoding processes (default: every core)")
    p.add_argument("--labels", type=Path, default=None, help="a Data_Entry CSV to use instead")
    p.add_argument(
        "--skip-bad", action="store_true", help="skip missing or unreadable images and list them in the manifest"
    )

    def run(args):
        from cxrjax.data.prepare import prepare

        opts = PrepareOptions(
            image_size=args.image_size,
            split=args.split,
            val_fraction=args.val_fraction,
            fractions=args.fractions,
            seed=args.seed,
            source_size=args.source_size,
            records_per_shard=args.records_per_shard,
            workers=args.workers,
            skip_bad=args.skip_bad,
            labels=str(args.labels) if args.labels else None,
        )
        manifest = prepare(args.nih_dir, args.out, opts)
        counts = ", ".join(f"{k} {v['images']}" for k, v in manifest["parts"].items())
        print(
            f"prepared {counts} images at {args.image_size}px in {args.out}"
            f" ({manifest['skipped']['count']} skipped; {manifest['color_converted_to_gray']['count']} colour"
            f" images made gray, {manifest['pngs_not_in_label_file']['count']} PNGs not in the label file,"
            f" {manifest['label_rows_in_no_split']['count']} label rows in no split list)"
        )

    p.set_defaults(func=_input_errors_to_exit(run))


def _input_errors_to_exit(run):
    """Report bad input files as one `cxrjax: error:` line and exit status 2, and a full
    disk as one line and status 1."""

    def wrapped(args):
        from cxrjax.errors import InputError

        try:
            return run(args)
        except InputError as e:
            print(f"cxrjax {args.command}: error: {e}", file=sys.stderr)
            return 2
        except Exception as e:
            full = disk_full(e)
            if full is None:
                raise
            print(f"cxrjax {args.command}: error: {full}; free some space and rerun the command", file=sys.stderr)
            return 1

    return wrapped


def disk_full(error: BaseException) -> str | None:
    """'no space left on device (FILE)' when `error`, or an error it was raised from (an
    async checkpoint save wraps it), is a full disk or quota; else None."""
    import errno

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return "no space left on device" + (f" ({error.filename})" if error.filename else "")
        if "No space left on device" in str(error) or "Disk quota exceeded" in str(error):  # tensorstore's text
            return "no space left on device"
        error = error.__cause__ or error.__context__
    return None


def _add_evaluate(sub) -> None:
    from cxrjax.eval.runinfo import SPLIT_FAMILIES  # a leaf: json and dataclasses only

    p = sub.add_parser("evaluate", help="metrics, report and figures for a predictions CSV or a trained model")
    given = p.add_mutually_exclusive_group(required=True)
    given.add_argument(
        "--predictions", type=Path, help="CSV: Image Index (or image_id) and one prob_<finding> column each"
    )
    given.add_argument(
        "--checkpoint",
        type=Path,
        help="training workdir (its best_weights: the best checkpoint by val mean AUC) "
        "or a weights directory; predicts a prepared part first",
    )
    p.add_argument(
        "--labels",
        type=Path,
        action="append",
        default=None,
        help="NIH Data_Entry CSV(.gz), or a labelled split list (evaluated whole); "
        "required with --predictions, default with --checkpoint: the part's index.csv. "
        "Give it again with the radiologist-adjudicated file (google2019_nih-chest-"
        "xray-labels.csv.gz) to score its four findings; alone, that file's own "
        "labels are used on the images it covers",
    )
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="--checkpoint: a `cxrjax prepare` folder (default: the run's data.prepared)",
    )
    p.add_argument(
        "--part",
        choices=("train", "val", "test"),
        default="test",
        help="--checkpoint: the prepared part to evaluate; thresholds come from val",
    )
    p.add_argument(
        "--tta",
        type=int,
        default=1,
        metavar="N",
        help="--checkpoint: average N views (the image and N-1 fixed small affine warps)",
    )
    p.add_argument("--batch-size", type=int, default=32, help="--checkpoint: images per jitted call")
    p.add_argument("--out", type=Path, required=True, help="folder for metrics.json, report.md, figures, run.json")
    p.add_argument(
        "--val-predictions", type=Path, default=None, help="validation-part predictions: thresholds are chosen on these"
    )
    p.add_argument("--val-labels", type=Path, default=None, help="labels for --val-predictions (default: --labels)")
    p.add_argument(
        "--compare",
        type=Path,
        default=None,
        help="another run's predictions on the same images: per-finding DeLong test",
    )
    p.add_argument(
        "--run-info",
        type=Path,
        default=None,
        help="run.json (name, split_family, split, px, backbone) for the leaderboard",
    )
    run = p.add_argument_group("the run, for `cxrjax leaderboard` (written to OUT/run.json; instead of --run-info)")
    run.add_argument("--name", default=None, help="the run's name on the leaderboard")
    run.add_argument(
        "--split-family",
        default=None,
        choices=SPLIT_FAMILIES,
        help="official: NIH's test list; random: a patient-wise random split (e.g. CheXNet's)",
    )
    run.add_argument("--split", default="", help="which split exactly, e.g. chexnet")
    run.add_argument("--px", type=int, default=None, help="input resolution in pixels")
    run.add_argument("--backbone", default="", help="e.g. DenseNet-121")
    run.add_argument(
        "--replicate-group",
        default="",
        help="runs giving the same group are replicates (e.g. seeds): one leaderboard entry with ± runs",
    )
    run.add_argument(
        "--test-images-full",
        type=int,
        default=None,
        help="images in the split's full test list (official: always 25,596); fewer scored: not ranked",
    )
    p.add_argument("--bootstrap", type=int, default=1000, help="patient resamples for CIs")
    p.add_argument("--seed", type=int, default=0, help="seed of the patient bootstrap")
    p.add_argument(
        "--target-sensitivity",
        type=float,
        default=0.9,
        help="the report's second threshold table: the threshold reaching this sensitivity on validation",
    )

    def run(args):
        from cxrjax.eval.evaluate_files import evaluate_files

        described = {
            "name": args.name,
            "split_family": args.split_family,
            "split": args.split,
            "px": args.px,
            "backbone": args.backbone,
            "replicate_group": args.replicate_group,
            "test_images_full": args.test_images_full,
        }
        run_info = args.run_info
        if any(v for v in described.values()):
            if args.run_info:
                p.error("give --run-info or --name/--split-family/..., not both")
            if not (args.name and args.split_family):
                p.error("--name and --split-family describe a run together (split, px and backbone are optional)")
            run_info = described
        if args.predictions and not args.labels:
            p.error("--labels is required with --predictions")
        if args.predictions and (args.data or args.tta != 1):
            p.error("--data and --tta apply to --checkpoint")
        m = evaluate_files(
            args.out,
            predictions=args.predictions,
            checkpoint=args.checkpoint,
            labels=args.labels or (),
            data=args.data,
            part=args.part,
            tta=args.tta,
            batch_size=args.batch_size,
            val_predictions=args.val_predictions,
            val_labels=args.val_labels,
            compare=args.compare,
            run_info=run_info,
            n_bootstrap=args.bootstrap,
            seed=args.seed,
            target_sensitivity=args.target_sensitivity,
        )
        from cxrjax.workdir import REPORT

        mean = "n/a" if m["mean_auc"] is None else f"{m['mean_auc']:.4f}"
        print(
            f"mean AUC {mean} over {m['n_findings_in_mean']} findings, "
            f"{m['n_images']} images; report: {args.out / REPORT}"
        )

    p.set_defaults(func=_input_errors_to_exit(run))


def _add_leaderboard(sub) -> None:
    p = sub.add_parser("leaderboard", help="rank evaluated runs against published baselines")
    p.add_argument("run_dirs", type=Path, nargs="+", help="folders with metrics.json + run.json")
    p.add_argument("--out", type=Path, required=True, help="folder for leaderboard.md, .csv and .png")

    def run(args):
        from cxrjax.eval.leaderboard import write_leaderboard

        paths = write_leaderboard(args.run_dirs, args.out)
        print(f"leaderboard: {paths['md']}")

    p.set_defaults(func=_input_errors_to_exit(run))


def _add_ensemble(sub) -> None:
    p = sub.add_parser("ensemble", help="average several prediction CSVs per image")
    p.add_argument("predictions", type=Path, nargs="+", help="predictions CSVs of the members, same images")
    p.add_argument("--out", type=Path, required=True, help="the averaged predictions CSV to write")

    def run(args):
        from cxrjax.eval.ensemble import ensemble_files

        print(f"ensemble of {len(args.predictions)}: {ensemble_files(args.predictions, args.out)}")

    p.set_defaults(func=_input_errors_to_exit(run))


def _add_train(sub) -> None:
    from cxrjax.config import OVERRIDES_HELP

    p = sub.add_parser(
        "train",
        help="train (or resume) a model; --config.FIELD=VALUE overrides any config field",
        description="Train (or resume) a model in --workdir; rerunning the same command resumes it.",
        epilog=f"Overrides: {OVERRIDES_HELP}. The value follows '=' (--config.data.prepared=/data/nih-224, "
        "not a space). A rerun may change only the fields docs/training.md lists as changeable on resume.",
    )
    p.add_argument(
        "--config",
        required=True,
        help="a recipe (chexnet, fisher2025, full1024, demo; NAME:smoke for its smoke variant) "
        "or a config file path.py[:variant]",
    )
    p.add_argument("--workdir", type=Path, required=True, help="the run folder; rerunning the same command resumes")
    p.set_defaults(accepts_overrides=True)

    def run(args):
        from cxrjax.config import load_config
        from cxrjax.experiment import train_members
        from cxrjax.train.divergence import TrainingDiverged

        config = load_config(args.config, args.overrides)
        try:
            summary = train_members(config, args.workdir)
        except TrainingDiverged as e:
            print(f"cxrjax train: error: {e}", file=sys.stderr)
            return 1
        from cxrjax.summaries import train_summary

        print(train_summary(summary))
        return 0

    p.set_defaults(func=_input_errors_to_exit(run))


def _add_import_weights(sub) -> None:
    p = sub.add_parser(
        "import-weights",
        help="Keras (.h5, .weights.h5) or torchvision (.pth) DenseNet weights -> weights artifact",
    )
    p.add_argument("--source", type=Path, required=True, help="the weights file: .h5, .weights.h5 or .pth")
    p.add_argument("--out", type=Path, required=True, help="new weights directory")
    p.add_argument("--arch", default="densenet121", help="densenet121|densenet169|densenet201|tiny")
    p.add_argument("--head", default="chexnet", help="chexnet|fisher (a fisher head starts fresh)")
    p.add_argument("--cbam", action="store_true", help="add CBAM (freshly initialized)")
    p.add_argument(
        "--in-channels", type=int, default=3, choices=(1, 3), help="1: a grayscale stem (the RGB kernels summed)"
    )
    p.add_argument("--backbone-only", action="store_true", help="drop any classifier in the source")

    def run(args):
        import json

        from cxrjax.models import default_model_config
        from cxrjax.models.import_weights import import_weights

        cfg = default_model_config()
        cfg.update(arch=args.arch, head=args.head, cbam=args.cbam, in_channels=args.in_channels)
        try:
            report = import_weights(args.source, args.out, cfg, backbone_only=args.backbone_only)
        except (ValueError, ImportError, OSError) as e:  # bad file or options (WeightsError is a ValueError)
            print(f"cxrjax import-weights: error: {e}", file=sys.stderr)
            return 2
        report["loaded"] = len(report["loaded"])
        print(json.dumps(report, indent=2))
        return 0

    p.set_defaults(func=run)


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="synthetic (or --nih-dir) data -> prepare -> train DenseNet121+CBAM -> evaluate -> leaderboard",
    )
    p.add_argument(
        "--out", type=Path, default=Path("cxrjax-demo"), help="folder for every stage; rerunning reuses finished ones"
    )
    p.add_argument("--nih-dir", type=Path, default=None, help="a real NIH download instead of the synthetic dataset")
    p.add_argument(
        "--config",
        default="demo",
        help="a recipe name or config file (default: demo); --config.FIELD=VALUE overrides any field",
    )
    p.set_defaults(accepts_overrides=True)

    def run(args):
        from cxrjax.config import load_config
        from cxrjax.demo import run_demo

        config = load_config(args.config, args.overrides)
        summary = run_demo(args.out, config, args.nih_dir)
        kind = "synthetic test part" if summary["synthetic"] else "test part"
        mean = "undefined" if summary["mean_auc"] is None else f"{summary['mean_auc']:.4f}"
        print(f"mean AUC {mean} on the {kind}; metrics: {summary['metrics']}; leaderboard: {summary['leaderboard']}")
        if summary["synthetic"]:
            print("(synthetic data: this shows the pipeline works end to end; it is not a clinical result)")
        return 0

    p.set_defaults(func=_input_errors_to_exit(run))


def _image_model_arguments(p, out_help: str) -> None:
    """The inputs predict and gradcam share: PNGs, the model, the output, and batching."""
    p.add_argument("paths", type=Path, nargs="+", help="PNG files, or folders searched for *.png")
    p.add_argument("--weights", type=Path, required=True, help="weights directory or training workdir")
    p.add_argument("--out", type=Path, required=True, help=out_help)
    p.add_argument(
        "--image-size", type=int, default=None, help="model input size for weights without a training run (default 224)"
    )
    p.add_argument("--batch-size", type=int, default=32, help="images per jitted call")


def _on_images(run, args, **options) -> dict:
    """`run` (`run_predict`, `run_gradcam`) on the inputs `_image_model_arguments` declared."""
    return run(args.weights, args.paths, args.out, image_size=args.image_size, batch_size=args.batch_size, **options)


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="probabilities CSV for PNG files or folders (optional Grad-CAM heatmaps)")
    _image_model_arguments(p, "CSV to write: Image Index (file name), prob_<finding>")
    p.add_argument(
        "--heatmaps",
        type=Path,
        default=None,
        help="also write Grad-CAM overlays of each image's --top-k findings in this folder",
    )
    p.add_argument("--top-k", type=int, default=1, metavar="K", help="with --heatmaps: overlays per image")
    p.add_argument(
        "--tta",
        type=int,
        default=1,
        metavar="N",
        help="average N views (the image and N-1 fixed small affine warps); heatmaps use the image",
    )

    def run(args):
        from cxrjax.eval.inference import run_predict

        summary = _on_images(run_predict, args, heatmaps=args.heatmaps, top_k=args.top_k, tta=args.tta)
        print(
            f"{summary['images']} images with {summary['model']}: {summary['predictions']}"
            + (f"; heatmaps: {summary['heatmaps']}" if "heatmaps" in summary else "")
        )

    p.set_defaults(func=_input_errors_to_exit(run))


def _add_gradcam(sub) -> None:
    p = sub.add_parser("gradcam", help="Grad-CAM heatmaps overlaid on PNG images, at their original size")
    _image_model_arguments(p, "folder for <image>_<finding>.png and gradcam.csv")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--findings", default=None, help="comma-separated findings, e.g. Effusion,Mass")
    which.add_argument("--top-k", type=int, default=1, metavar="K", help="each image's K most probable findings")

    def run(args):
        from cxrjax.eval.inference import run_gradcam

        summary = _on_images(run_gradcam, args, findings=args.findings, top_k=args.top_k)
        from cxrjax.summaries import plural

        print(
            f"{plural(summary['overlays'], 'overlay')} for {plural(summary['images'], 'image')} "
            f"with {summary['model']}: {summary['index']}"
        )

    p.set_defaults(func=_input_errors_to_exit(run))


def _add_bench(sub) -> None:
    from cxrjax.bench.args import add_arguments

    p = sub.add_parser(
        "bench",
        help="throughput, compile time, memory, FLOPs and MFU of the training step, with torch/keras peers",
    )
    add_arguments(p)

    def run(args):
        from cxrjax.bench.args import run as run_bench

        return run_bench(p, args, "cxrjax bench")

    p.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cxrjax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        _add_demo,
        _add_synth,
        _add_prepare,
        _add_train,
        _add_evaluate,
        _add_leaderboard,
        _add_ensemble,
        _add_import_weights,
        _add_predict,
        _add_gradcam,
        _add_bench,
    ):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from cxrjax.bench.gpu_target import ensure_plugin_registered

    ensure_plugin_registered()  # before JAX starts: no CUDA plugin traceback on a machine without a driver
    show_library_logs()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
