"""Grad-CAM (Selvaraju et al. 2017) heatmaps of a finding, overlaid on the original image.

For finding c: the gradient of its logit with respect to the final feature map A
(after CBAM when the model has it), averaged over space, weighs A's channels:
cam = ReLU(sum_k mean_ij(d logit_c / d A_ijk) * A_k). The map is computed at feature
resolution on the device, then upsampled (bilinear) to the original image and scaled
by its maximum into [0, 1] on the host.
"""

from __future__ import annotations

import functools
from pathlib import Path

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from cxrjax.data.normalize import to_model_input
from cxrjax.eval.model_source import InferenceError
from cxrjax.eval.paths import safe_child
from cxrjax.findings import ALIASES, FINDINGS, canonical

OVERLAY_ALPHA = 0.4  # share of the colour map in the overlay
INDEX_FILE = "gradcam.csv"


@functools.partial(jax.jit, static_argnums=0)  # one compile per model and shapes
def gradcam(model, mean, std, variables, images, classes):
    """(probabilities [B, 14], raw maps [B, K, h, w] float32) for uint8 images
    [B, H, W, 1] and finding indices `classes` [B, K]; mean and std per channel."""
    x = to_model_input(images, mean, std, model.dtype)
    fmap = model.apply(variables, x, method="features")
    logits, vjp = jax.vjp(lambda f: model.apply(variables, f, method="classify"), fmap)
    # Inference mode: images do not interact, so one cotangent row per image gives each
    # image's own gradient. One backward pass per requested slot k.
    cotangents = jax.nn.one_hot(classes.T, logits.shape[-1], dtype=logits.dtype)  # [K, B, 14]
    (grads,) = jax.vmap(vjp)(cotangents)  # [K, B, h, w, C]
    weights = grads.astype(jnp.float32).mean(axis=(2, 3))  # [K, B, C]
    cams = jnp.einsum("kbc,bhwc->bkhw", weights, fmap.astype(jnp.float32))
    return jax.nn.sigmoid(logits), jax.nn.relu(cams)


def heatmap(cam: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A raw map [h, w] → float32 [H, W] in [0, 1] at the image's resolution (all zero
    when no region raises the logit)."""
    up = cv2.resize(np.asarray(cam, np.float32), (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
    up = np.maximum(up, 0.0)
    peak = float(up.max())
    return up / peak if peak > 0 else up


def overlay(gray: np.ndarray, heat: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """BGR uint8 [H, W, 3]: the gray image blended with the jet colour map of `heat`."""
    color = cv2.applyColorMap(np.round(heat * 255).astype(np.uint8), cv2.COLORMAP_JET)
    base = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    return cv2.addWeighted(base, 1 - alpha, color, alpha, 0)


def annotate(picture: np.ndarray, finding: str, probability: float) -> np.ndarray:
    """The overlay with its title (finding, probability) at the top left and a colour bar
    of the map (1 at the top, 0 at the bottom) at the right edge, drawn inside the image so
    it keeps the original size."""
    out = picture.copy()
    h, w = out.shape[:2]
    bar_w, top, bottom = max(3, w // 40), max(2, h // 10), h - max(2, h // 10)
    left = w - bar_w - max(2, w // 60)
    ramp = np.linspace(255, 0, bottom - top).astype(np.uint8)[:, None].repeat(bar_w, axis=1)
    out[top:bottom, left : left + bar_w] = cv2.applyColorMap(ramp, cv2.COLORMAP_JET)
    scale = max(0.3, w / 1400)
    thick = max(1, round(scale * 2))

    def text(s, x, y):
        cv2.putText(out, s, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thick + 2, cv2.LINE_AA)
        cv2.putText(out, s, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thick, cv2.LINE_AA)

    (_, text_h), _ = cv2.getTextSize("0", cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    text(f"Grad-CAM: {finding.replace('_', ' ')} p={probability:.3f}", max(2, w // 60), text_h + max(2, h // 60))
    text("1", left - text_h - 2, top + text_h)
    text("0", left - text_h - 2, bottom)
    return out


def overlay_name(image_id: str, finding: str) -> str:
    stem = image_id[:-4] if image_id.lower().endswith(".png") else image_id
    return f"{stem}_{finding}.png"


def finding_indices(names: str) -> tuple[int, ...]:
    """'Effusion,Mass' → FINDINGS indices (any spelling `canonical` knows)."""
    by_lower = {name.lower(): name for name in (*FINDINGS, *ALIASES)}  # `effusion` is Effusion
    try:
        found = [FINDINGS.index(canonical(by_lower.get(n.strip().lower(), n))) for n in names.split(",") if n.strip()]
    except ValueError as e:
        raise InferenceError(str(e)) from None
    if not found:
        raise InferenceError("no finding named; give e.g. --findings Effusion,Mass")
    return tuple(dict.fromkeys(found))


class HeatmapWriter:
    """Writes overlays for each batch a Predictor runs: chosen findings, or each image's
    `top_k` most probable ones. Output names come from image ids and are checked with
    `safe_child`, so none lands outside `out_dir`."""

    def __init__(self, predictor, out_dir: str | Path, findings: tuple[int, ...] | None = None, top_k: int = 1):
        if findings is None and not 1 <= top_k <= len(FINDINGS):
            raise InferenceError(f"--top-k must be between 1 and {len(FINDINGS)}, got {top_k}")
        self.predictor = predictor
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.findings = findings
        self.top_k = top_k
        self.rows: list[dict] = []

    def classes(self, probs: np.ndarray) -> np.ndarray:
        if self.findings is not None:
            return np.tile(np.asarray(self.findings, np.int32), (len(probs), 1))
        return np.argsort(-probs, axis=1, kind="stable")[:, : self.top_k].astype(np.int32)

    def __call__(self, ids, originals, images, probs) -> None:
        classes = self.classes(probs)
        p = self.predictor
        _, cams = gradcam(p.model, *p.stats, p.variables, *p.put(images, classes))
        cams = np.asarray(jax.device_get(cams))[: len(ids)]
        for i, image_id in enumerate(ids):
            for k, c in enumerate(classes[i]):
                finding = FINDINGS[c]
                path = safe_child(self.out_dir, overlay_name(image_id, finding))
                picture = overlay(originals[i], heatmap(cams[i, k], originals[i].shape))
                picture = annotate(picture, finding, float(probs[i, c]))
                if not cv2.imwrite(str(path), picture):
                    raise OSError(f"{path}: could not write the overlay")
                self.rows.append(
                    {"image_id": image_id, "finding": finding, "probability": float(probs[i, c]), "overlay": path.name}
                )

    def write_index(self) -> Path:
        path = safe_child(self.out_dir, INDEX_FILE)
        pd.DataFrame(self.rows, columns=["image_id", "finding", "probability", "overlay"]).to_csv(path, index=False)
        return path
