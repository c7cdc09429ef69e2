"""Figures (issue 21.8): leaderboard panels share one y-axis range, the reliability curve
skips empty and near-empty bins, Grad-CAM overlays carry a title and a colour bar."""

import cv2
import numpy as np
from matplotlib.figure import Figure

from cxrjax.eval import plots
from cxrjax.eval.gradcam import annotate, overlay
from cxrjax.findings import FINDINGS


def test_leaderboard_panels_share_their_y_axis(monkeypatch, tmp_path):
    """leaderboard.png's panels started at 0.32 and 0.5: bars did not compare across them."""
    drawn = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, path, **kw: drawn.append(fig))
    low = {f: 0.34 for f in FINDINGS}
    high = {f: 0.8 for f in FINDINGS}
    plots.auc_panels([("a", [("run a", low, True)]), ("b", [("run b", high, True)])], tmp_path / "x.png")
    (fig,) = drawn
    limits = {ax.get_ylim() for ax in fig.axes}
    assert len(limits) == 1 and np.isclose(limits.pop()[0], 0.32)


def test_the_reliability_line_skips_empty_and_small_bins():
    """The Platt curve swung 0 <-> 1 through bins of one or two images and across empty bins."""
    bins = {
        "count": [30, 0, 2, 40, 15],
        "mean_score": [0.05, None, 0.45, 0.6, 0.9],
        "positive_rate": [0.1, None, 1.0, 0.5, 0.8],
    }
    x, y, count, line = plots.reliability_points(bins)
    assert np.allclose(x, [0.05, np.nan, 0.45, 0.6, 0.9], equal_nan=True)  # a break where the empty bin was
    assert np.allclose(line, [0.1, np.nan, np.nan, 0.5, 0.8], equal_nan=True)  # 2 images: off the line
    assert list(count) == [30, 0, 2, 40, 15] and np.isclose(y[2], 1.0)  # still drawn, as a hollow marker


def test_gradcam_overlays_have_a_title_and_a_colour_bar_at_their_size():
    gray = np.full((256, 200), 90, np.uint8)
    heat = np.zeros((256, 200), np.float32)
    plain = overlay(gray, heat)
    out = annotate(plain, "Pleural_Thickening", 0.8123)
    assert out.shape == plain.shape and out.dtype == np.uint8
    jet = cv2.applyColorMap(np.array([[255], [0]], np.uint8), cv2.COLORMAP_JET)[:, 0]
    # 200 px wide: a 5 px bar at columns 192-196, rows 25-230 (a tenth of the height off each end).
    assert np.array_equal(out[25, 194], jet[0]) and np.array_equal(out[230, 194], jet[1])  # 1 on top, 0 below
    assert np.array_equal(out[24, 194], plain[24, 194]) and np.array_equal(out[128, 198], plain[128, 198])
    assert (out[:20, :150] != plain[:20, :150]).any()  # the title


def test_bench_figures_draw_only_measured_tasks_with_sizes_under_their_bars():
    """The quick GPU run measures training only: its throughput figure had an empty
    inference panel, and with one image size the size label sat at the panel's edge."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cxrjax.bench.report import bar_figure

    def row(framework, size, task="train"):
        return {"framework": framework, "task": task, "size": size, "dtype": "bfloat16", "remat": "all", "v": 10.0}

    fig = bar_figure([row("cxrjax", 1024), row("torch", 1024)], "v", "images/s", 1.0, "quick")
    (ax,) = fig.axes  # training only: one panel
    assert ax.get_title() == "train" and ax.get_xlim() == (-0.5, 0.5)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1024 px"]
    assert all(-0.5 < p.get_x() and p.get_x() + p.get_width() < 0.5 for p in ax.patches)
    plt.close(fig)
    fig = bar_figure([row("cxrjax", 224), row("cxrjax", 1024, "inference")], "v", "images/s", 1.0, "both")
    assert [a.get_title() for a in fig.axes] == ["train", "inference"]
    plt.close(fig)
