"""wsss.viz plots the values it is given (read back from the figures' artists and the saved pixels), at the
documented sizes, and writes a Markdown table with every class."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from wsss import viz
from wsss.metrics import confusion_matrix, scores

NAMES = ["background", "aeroplane", "bicycle", "bird"]
# The VOC palette, written out: background, aeroplane, bicycle, bird, and 255 (ignore).
VOC = {0: (0, 0, 0), 1: (128, 0, 0), 2: (0, 128, 0), 3: (128, 128, 0), 255: (224, 224, 192)}


def png_pixels(path) -> np.ndarray:
    """The saved PNG as (H, W, 3) uint8 RGB."""
    with Image.open(path) as img:
        assert img.format == "PNG"
        return np.asarray(img.convert("RGB"))


def test_threshold_curve_plots_each_curve_and_the_best_threshold(tmp_path):
    t = [0.0, 0.1, 0.2, 0.3, 0.4]
    curves = {"mIoU": [20.0, 35.5, 50.0, 61.25, 58.0], "recall": [None, 90.0, 80.0, math.nan, 60.0]}
    ax = viz.threshold_curve_figure(t, curves, 0.3).axes[0]
    assert [line.get_label() for line in ax.lines] == ["mIoU", "recall", "best t = 0.3"]
    for line in ax.lines[:2]:
        np.testing.assert_array_equal(line.get_xdata(), t)
    np.testing.assert_array_equal(ax.lines[0].get_ydata(), [20.0, 35.5, 50.0, 61.25, 58.0])
    np.testing.assert_array_equal(ax.lines[1].get_ydata(), [np.nan, 90.0, 80.0, np.nan, 60.0])  # None: a gap
    np.testing.assert_array_equal(ax.lines[2].get_xdata(), [0.3, 0.3])  # the vertical line at best t
    assert [text.get_text() for text in ax.get_legend().get_texts()] == ["mIoU", "recall", "best t = 0.3"]
    assert ax.get_ylim() == (0, 100)
    assert [line.get_label() for line in viz.threshold_curve_figure(t, curves, None).axes[0].lines] == [
        "mIoU",
        "recall",
    ]
    with pytest.raises(ValueError, match="values"):
        viz.threshold_curve_figure(t, {"mIoU": [1, 2]}, None)

    out = viz.plot_threshold_curve(t, curves, 0.3, tmp_path / "curve.png")
    assert png_pixels(out).shape == (420, 640, 3)
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, no temp file left


def test_class_iou_bars_are_the_values_and_the_line_their_defined_mean(tmp_path):
    ax = viz.class_iou_figure(NAMES, [80.0, 55.5, math.nan, None]).axes[0]
    bars = ax.patches
    assert [b.get_height() for b in bars] == [80.0, 55.5, 0.0, 0.0]  # undefined: an empty bar ...
    assert [b.get_x() + b.get_width() / 2 for b in bars] == [0, 1, 2, 3]
    assert sorted(t.get_position()[0] for t in ax.texts if t.get_text() == "n/a") == [2, 3]  # ... marked n/a
    assert [tuple(b.get_facecolor()) for b in bars] == [
        (r / 255, g / 255, b / 255, 1.0) for r, g, b in [*VOC.values()][:4]
    ]
    assert [tick.get_text() for tick in ax.get_xticklabels()] == NAMES
    (mean,) = ax.lines
    np.testing.assert_array_equal(mean.get_ydata(), [67.75, 67.75])  # (80 + 55.5) / 2: the defined values only
    assert mean.get_label() == "mean 67.8"

    assert png_pixels(viz.plot_class_iou(NAMES, [80.0, 55.5, math.nan, None], tmp_path / "iou.png")).shape[:2] == (
        400,
        640,
    )
    many = [f"class{i}" for i in range(81)]  # COCO-sized: 0.32 inch per class
    assert png_pixels(viz.plot_class_iou(many, list(range(81)), tmp_path / "coco.png")).shape[:2] == (400, 2712)


def _panel_pixels(png: np.ndarray, ax, shape: tuple[int, int]) -> np.ndarray:
    """The saved pixel at the centre of each of the H x W cells of the image drawn in `ax`: (H, W, 3)."""
    x0, y0, x1, y1 = ax.get_window_extent().extents  # display pixels, origin bottom left
    h, w = shape
    cols = (x0 + (np.arange(w) + 0.5) / w * (x1 - x0)).astype(int)
    rows = (png.shape[0] - (y1 - (np.arange(h) + 0.5) / h * (y1 - y0))).astype(int)
    return png[rows[:, None], cols[None, :]]


def test_overlay_grid_panels_show_the_image_the_heat_and_the_palette_colours(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for i, (h, w) in enumerate([(30, 40), (40, 30)]):
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        heat = np.zeros((h, w), np.float32)
        heat[:, w // 2 :] = 1.0  # cold left half, hot right half
        gt = np.zeros((h, w), np.uint8)
        gt[5:20, 5:20] = i + 1
        gt[4, 5:20] = 255
        pred = np.zeros((h, w), np.uint8)
        pred[10:25, 2:12] = 3
        rows.append((f"image {i}", image, heat, [("pseudo mask", pred), ("ground truth", gt)]))
    png = png_pixels(viz.overlay_grid(rows, tmp_path / "grid.png"))
    assert png.shape[:2] == (500, 960)  # 4 panels x 2.4 in, 2 rows x 2.4 in + 0.2 in, at 100 dpi
    fig = viz.overlay_grid_figure(rows)  # the same figure, for where its panels lie
    fig.set_dpi(viz.DPI)
    fig.draw_without_rendering()
    # jet at 0 (0, 0, 0.5) and at 1 (0.5, 0, 0), blended half and half over the image
    cold, hot = np.array([0, 0, 0.5]) * 255 / 2, np.array([0.5, 0, 0]) * 255 / 2
    for r, (_, image, _, ((_, pred), (_, gt))) in enumerate(rows):
        h, w = gt.shape
        image_panel, cam_panel, pred_panel, gt_panel = (
            _panel_pixels(png, ax, (h, w)) for ax in fig.axes[4 * r : 4 * r + 4]
        )
        np.testing.assert_array_equal(image_panel, image)
        np.testing.assert_array_equal(pred_panel, np.array([VOC[v] for v in pred.ravel()]).reshape(h, w, 3))
        np.testing.assert_array_equal(gt_panel, np.array([VOC[v] for v in gt.ravel()]).reshape(h, w, 3))
        assert set(np.unique(gt)) == {0, r + 1, 255}  # background, one class, ignore: all three checked
        # away from the bilinear seam between the halves
        np.testing.assert_allclose(cam_panel[:, : w // 2 - 2], image[:, : w // 2 - 2] / 2 + cold, atol=1.5)
        np.testing.assert_allclose(cam_panel[:, w // 2 + 2 :], image[:, w // 2 + 2 :] / 2 + hot, atol=1.5)

    seeded = [(t, im, ht, [("seed", m[0][1]), *m]) for t, im, ht, m in rows]
    assert png_pixels(viz.overlay_grid(seeded, tmp_path / "grid5.png")).shape[:2] == (500, 1200)  # a fifth panel
    np.testing.assert_array_equal(viz.colorize(np.array([[0, 1, 255]], np.uint8)), [[VOC[0], VOC[1], VOC[255]]])


def test_markdown_table_lists_each_class_and_the_miou():
    gt = torch.tensor([[0, 0, 1, 1, 2, 2]], dtype=torch.uint8)
    pred = torch.tensor([[0, 1, 1, 1, 2, 0]], dtype=torch.uint8)
    s = scores(confusion_matrix(gt, pred, 4))  # label 3 (bird) absent
    table = viz.markdown_table(NAMES[1:], s)  # foreground names: background is prepended
    lines = table.splitlines()
    for name in NAMES:
        assert any(line.startswith(f"| {name} |") for line in lines), name
    assert f"{s['miou']:.2f}" in table
    assert table.rstrip().endswith(f"foreground mIoU {s['fg_miou']:.2f}")
    assert "| bird | – |" in table
    # The evaluate stage's summary form: per-label dicts keyed by name, None for undefined values.
    named = {k: dict(zip(NAMES, s[k], strict=True)) for k in ("iou", "precision", "recall", "fp_ratio", "fn_ratio")}
    named["iou"]["bird"] = None
    assert viz.markdown_table(NAMES, {**s, **named}) == viz.markdown_table(NAMES, s)
