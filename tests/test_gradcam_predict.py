"""`cxrjax predict` and `cxrjax gradcam` against direct model calls and a hand-written
jax.grad Grad-CAM, on a tiny model (CBAM + Fisher head, so the gradients vary in space)."""

import functools
import os

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from tiny_run import write_run

from cxrjax.cli import main
from cxrjax.eval.gradcam import HeatmapWriter, gradcam, heatmap
from cxrjax.eval.inference import Predictor, tta_views
from cxrjax.eval.model_source import load_trained
from cxrjax.eval.paths import UnsafePathError
from cxrjax.eval.predictions import read_predictions
from cxrjax.findings import FINDINGS
from cxrjax.models import build_model
from cxrjax.workdir import BEST_WEIGHTS, CHECKPOINTS, RUN_CONFIG

SIZE = 96  # model input: a 3x3 final feature map for the tiny DenseNet
MEAN, STD = 0.45, 0.22  # the run's "dataset" normalization statistics


def _picture(rng, h, w):
    """A smooth gray picture with a bright blob, so resizing and heatmaps have structure."""
    yy, xx = np.mgrid[0:h, 0:w]
    blob = np.exp(-((yy - rng.uniform(0, h)) ** 2 + (xx - rng.uniform(0, w)) ** 2) / (0.05 * h * w))
    noise = cv2.GaussianBlur(rng.uniform(0, 1, (h, w)), (0, 0), 3)
    return np.clip(255 * (0.6 * blob + 0.4 * noise), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("infer")
    model_cfg, variables = write_run(tmp / "run", SIZE, dataset_stats=(MEAN, STD), cbam=True, head="fisher")
    rng = np.random.default_rng(0)
    folder = tmp / "images"
    (folder / "sub").mkdir(parents=True)
    gray = {}
    for name, (h, w) in {
        "00000001_000.png": (128, 128),
        "00000002_000.png": (200, 160),
        "sub/00000003_000.png": (96, 96),  # the model's size: taken as it is
    }.items():
        gray[name.split("/")[-1]] = _picture(rng, h, w)
        cv2.imwrite(str(folder / name), gray[name.split("/")[-1]])
    rgba_gray = _picture(rng, 120, 120)  # an RGBA file with equal channels, as in NIH
    rgba = np.dstack([rgba_gray] * 3 + [np.full_like(rgba_gray, 255)])
    cv2.imwrite(str(tmp / "00000004_000.png"), rgba)
    gray["00000004_000.png"] = rgba_gray
    model = build_model(model_cfg)
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False))  # the reference forward pass
    return {
        "apply": apply,
        "tmp": tmp,
        "run": tmp / "run",
        "folder": folder,
        "rgba": tmp / "00000004_000.png",
        "gray": gray,
        "model": model,
        "variables": variables,
    }


def _model_input(gray: np.ndarray, mean=MEAN, std=STD) -> np.ndarray:
    """Training preprocessing written out: area resize, [0, 1], normalize, 3 channels."""
    small = cv2.resize(gray, (SIZE, SIZE), interpolation=cv2.INTER_AREA if gray.shape[0] > SIZE else cv2.INTER_LINEAR)
    x = (small.astype(np.float32) / 255.0 - mean) / std
    return np.repeat(x[..., None], 3, axis=-1)


def _direct_probs(setup, x: np.ndarray) -> np.ndarray:
    """sigmoid(model.apply) one image at a time, on one device."""
    logits = np.concatenate([setup["apply"](setup["variables"], jnp.asarray(xi[None])) for xi in x])
    return 1 / (1 + np.exp(-logits.astype(np.float64)))


def test_predict_files_folders_and_rgba_match_a_direct_model_call(setup, tmp_path):
    out = tmp_path / "p.csv"
    assert (
        main(
            [
                "predict",
                "--weights",
                str(setup["run"]),
                str(setup["folder"]),
                str(setup["rgba"]),
                "--out",
                str(out),
                "--batch-size",
                "3",
            ]
        )
        == 0
    )
    preds = read_predictions(out)
    assert list(preds.image_ids) == ["00000001_000.png", "00000002_000.png", "00000003_000.png", "00000004_000.png"]
    # Read back independently: cv2's own grayscale decoding of every file.
    files = {p.name: p for p in setup["tmp"].rglob("*.png")}
    for image_id, got in zip(preds.image_ids, preds.probs):
        gray = cv2.imread(str(files[image_id]), cv2.IMREAD_GRAYSCALE)
        np.testing.assert_array_equal(gray, setup["gray"][image_id])
        want = _direct_probs(setup, _model_input(gray)[None])[0]
        np.testing.assert_allclose(got, want, atol=2e-6, err_msg=image_id)
    assert np.ptp(preds.probs, axis=0).max() > 1e-4  # the images get different answers


def test_bare_weights_dir_uses_imagenet_statistics_and_refuses_other_sizes(setup, tmp_path):
    import shutil

    bare = tmp_path / "weights"  # the same weights outside their run: no config.json next to them
    shutil.copytree(setup["run"] / BEST_WEIGHTS, bare)
    out = tmp_path / "p.csv"
    assert (
        main(["predict", "--weights", str(bare), "--image-size", str(SIZE), str(setup["rgba"]), "--out", str(out)]) == 0
    )
    x = _model_input(setup["gray"]["00000004_000.png"], 0.0, 1.0)  # [0, 1] in 3 channels
    x = (x - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
    np.testing.assert_allclose(read_predictions(out).probs[0], _direct_probs(setup, x[None])[0], atol=2e-6)
    with pytest.raises(ValueError, match=f"trained at {SIZE}px"):
        load_trained(setup["run"], image_size=64)


def test_tta_views_are_fixed_warps_and_probabilities_average_them(setup):
    predictor = Predictor(load_trained(setup["run"]), batch_size=8)
    gray = setup["gray"]["00000002_000.png"]
    small = cv2.resize(gray, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    images = np.stack([small, small, 255 - small])[..., None]
    views = tta_views(images, 3, predictor.trained.augment)
    again = tta_views(images, 3, predictor.trained.augment)
    assert len(views) == 3 and all(v.shape == images.shape and v.dtype == np.uint8 for v in views)
    np.testing.assert_array_equal(views[0], images)
    for a, b in zip(views, again):
        np.testing.assert_array_equal(a, b)  # deterministic
    for v in views[1:]:
        assert np.abs(v.astype(int) - images).mean() > 1  # warped
        np.testing.assert_array_equal(v[0], v[1])  # the same warp for every image of a batch
    assert np.abs(views[1].astype(int) - views[2]).mean() > 1  # a different warp per view
    np.testing.assert_array_equal(tta_views(images[2:], 3, predictor.trained.augment)[2][0], views[2][2])

    got = predictor.probs(images, tta=3)
    x = np.stack([(v[..., 0].astype(np.float32) / 255 - MEAN) / STD for v in views])
    want = np.mean([_direct_probs(setup, np.repeat(xv[..., None], 3, -1)) for xv in x], axis=0)
    np.testing.assert_allclose(got, want, atol=2e-6)
    np.testing.assert_array_equal(predictor.probs(images, tta=3), got)
    assert np.abs(got - predictor.probs(images, tta=1)).max() > 1e-5
    with pytest.raises(ValueError, match="at least 1"):
        predictor.probs(images, tta=0)


def _reference_cam(model, variables, x, c):
    """Grad-CAM by hand for one image x [H, W, 3] and finding c: jax.grad of that
    logit with respect to the final feature map, channel weights, ReLU."""
    fmap = model.apply(variables, x[None], method="features")[0]
    grads = jax.grad(lambda f: model.apply(variables, f[None], method="classify")[0, c])(fmap)
    weights = grads.mean(axis=(0, 1))
    return jnp.maximum((fmap * weights).sum(-1), 0)


def test_gradcam_equals_a_hand_written_jax_grad_reference(setup):
    model, variables = setup["model"], setup["variables"]
    predictor = Predictor(load_trained(setup["run"]), batch_size=8)
    ids = ["00000001_000.png", "00000002_000.png", "00000004_000.png"]
    images = np.stack([cv2.resize(setup["gray"][i], (SIZE, SIZE), interpolation=cv2.INTER_AREA) for i in ids])[
        ..., None
    ]
    classes = np.array([[2, 4], [0, 13], [7, 7]], np.int32)
    probs, cams = gradcam(model, *predictor.stats, predictor.variables, *predictor.put(images, classes))
    probs, cams = np.asarray(probs)[:3], np.asarray(cams)[:3]  # the rest is padding
    x = np.stack([_model_input(setup["gray"][i]) for i in ids])
    np.testing.assert_allclose(probs, _direct_probs(setup, x), atol=2e-6)
    assert cams.shape == (3, 2, 3, 3)
    reference = jax.jit(functools.partial(_reference_cam, model))
    for i in range(3):
        for k in range(2):
            want = reference(variables, jnp.asarray(x[i]), classes[i, k])
            np.testing.assert_allclose(cams[i, k], want, rtol=1e-4, atol=1e-6)
    spread = np.ptp(cams.reshape(6, 9), axis=1)
    assert (spread > 1e-4).sum() >= 2, cams  # maps with structure, not only the ReLU's zeros
    heat = heatmap(cams.reshape(6, 3, 3)[np.argmax(spread)], (200, 160))
    assert heat.shape == (200, 160) and heat.min() >= 0 and heat.max() == pytest.approx(1.0)
    np.testing.assert_array_equal(heatmap(np.zeros((3, 3)), (5, 4)), np.zeros((5, 4)))


def test_gradcam_cli_writes_overlays_at_original_size(setup, tmp_path):
    out = tmp_path / "cams"
    assert (
        main(
            [
                "gradcam",
                "--weights",
                str(setup["run"]),
                str(setup["folder"]),
                str(setup["rgba"]),
                "--findings",
                "Effusion,Pleural Thickening",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    index = pd.read_csv(out / "gradcam.csv")
    assert len(index) == 8 and set(index["finding"]) == {"Effusion", "Pleural_Thickening"}
    for row in index.itertuples():
        picture = cv2.imread(str(out / row.overlay), cv2.IMREAD_UNCHANGED)
        assert picture.shape == (*setup["gray"][row.image_id].shape, 3), row.overlay
    assert (out / "00000002_000_Effusion.png").exists()

    # --top-k picks each image's most probable finding, as predict reports it.
    preds = tmp_path / "p.csv"
    assert (
        main(
            [
                "predict",
                "--weights",
                str(setup["run"]),
                str(setup["folder"]),
                "--out",
                str(preds),
                "--heatmaps",
                str(tmp_path / "top"),
                "--top-k",
                "2",
            ]
        )
        == 0
    )
    p = read_predictions(preds)
    top = pd.read_csv(tmp_path / "top" / "gradcam.csv")
    for image_id, probs in zip(p.image_ids, p.probs):
        rows = top[top["image_id"] == image_id]
        assert list(rows["finding"]) == [FINDINGS[j] for j in np.argsort(-probs)[:2]]
        np.testing.assert_allclose(rows["probability"], np.sort(probs)[::-1][:2])


def test_output_names_cannot_escape_the_folder(setup, tmp_path):
    predictor = Predictor(load_trained(setup["run"]), batch_size=8)
    out = tmp_path / "out"
    writer = HeatmapWriter(predictor, out, findings=(2,))
    gray = setup["gray"]["00000003_000.png"]
    images = cv2.resize(gray, (SIZE, SIZE))[None, ..., None]
    with pytest.raises(UnsafePathError, match="escapes"):
        writer(["../../x.png"], [gray], images, predictor.probs(images))
    assert not (tmp_path / "x_Effusion.png").exists() and not list(tmp_path.parent.glob("x_Effusion.png"))

    # A link planted where an overlay will go is refused, and its target left alone.
    target = tmp_path / "elsewhere.png"
    target.write_bytes(b"keep")
    cams = tmp_path / "cams"
    cams.mkdir()
    os.symlink(target, cams / "00000003_000_Effusion.png")
    code = main(
        [
            "gradcam",
            "--weights",
            str(setup["run"]),
            str(setup["folder"] / "sub"),
            "--findings",
            "Effusion",
            "--out",
            str(cams),
        ]
    )
    assert code == 2 and target.read_bytes() == b"keep"


def test_bad_inputs_fail_with_the_file_named(setup, tmp_path, capsys):
    good = setup["folder"] / "00000001_000.png"
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[:200])
    weights = str(setup["run"])
    cases = [
        (["predict", "--weights", weights, str(cut), "--out", str(tmp_path / "p.csv")], f"{cut}: truncated PNG"),
        (
            ["predict", "--weights", weights, str(tmp_path / "none.png"), "--out", str(tmp_path / "p.csv")],
            "none.png: no such file or folder",
        ),
        (
            ["predict", "--weights", str(tmp_path / "nowhere"), str(good), "--out", str(tmp_path / "p.csv")],
            "nowhere: weights not found",
        ),
        (
            ["predict", "--weights", str(tmp_path), str(good), "--out", str(tmp_path / "p.csv")],
            "not a weights directory",
        ),
        (
            ["gradcam", "--weights", weights, str(good), "--findings", "Efusion", "--out", str(tmp_path / "c")],
            "unknown finding 'Efusion'",
        ),
    ]
    small = tmp_path / "small.png"  # 64 px for a 96 px model: refused, never upsampled
    cv2.imwrite(str(small), np.zeros((64, 80), np.uint8))
    for command in ("predict", "gradcam"):
        out = ["--out", str(tmp_path / ("p.csv" if command == "predict" else "c"))]
        cases.append(
            (
                [command, "--weights", weights, str(small), *out],
                f"{small}: image is 80x64, smaller than the model's input 96x96; cxrjax does not upsample",
            )
        )
    unfinished = tmp_path / "unfinished"
    (unfinished / CHECKPOINTS).mkdir(parents=True)
    (unfinished / RUN_CONFIG).write_text((setup["run"] / RUN_CONFIG).read_text())
    cases.append(
        (
            ["gradcam", "--weights", str(unfinished), str(good), "--out", str(tmp_path / "c")],
            "without best_weights/: its checkpoints/ hold a run that has not finished",
        )
    )
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.startswith(f"cxrjax {argv[0]}: error:"), err
    assert not (tmp_path / "p.csv").exists()
