"""wsss.viz writes non-empty PNGs of the documented sizes, and a Markdown table with every class."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from wsss import viz
from wsss.metrics import confusion_matrix, scores

NAMES = ["background", "aeroplane", "bicycle", "bird"]


def png_size(path) -> tuple[int, int]:
    assert path.is_file()
    assert path.stat().st_size > 1000
    with Image.open(path) as img:
        assert img.format == "PNG"
        return img.size  # (width, height)


def test_plot_threshold_curve(tmp_path):
    t = np.round(np.arange(0, 1.0, 0.05), 2)
    curves = {
        "mIoU": 60 - 100 * (t - 0.4) ** 2,
        "precision": 40 + 50 * t,
        "recall": [None, *list(90 - 60 * t[1:])],
    }
    out = viz.plot_threshold_curve(t, curves, 0.4, tmp_path / "curve.png")
    assert png_size(out) == (640, 420)
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, no temp file left
    with pytest.raises(ValueError, match="values"):
        viz.plot_threshold_curve(t, {"mIoU": [1, 2]}, None, tmp_path / "bad.png")


def test_plot_class_iou(tmp_path):
    out = viz.plot_class_iou(NAMES, [80.0, 55.5, math.nan, None], tmp_path / "iou.png")
    assert png_size(out) == (640, 400)
    many = [f"class{i}" for i in range(81)]  # COCO-sized: wider
    w, h = png_size(viz.plot_class_iou(many, list(range(81)), tmp_path / "coco.png"))
    assert 2600 <= w <= 2800
    assert h == 400


def test_overlay_grid(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for i, (h, w) in enumerate([(30, 40), (40, 30)]):
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        heat = rng.random((h, w)).astype(np.float32)
        gt = np.zeros((h, w), np.uint8)
        gt[5:20, 5:20] = i + 1
        gt[4, 5:20] = 255
        pred = np.where(heat > 0.5, i + 1, 0).astype(np.uint8)
        rows.append((f"image {i}", image, heat, [("pseudo mask", pred), ("ground truth", gt)]))
    w, h = png_size(viz.overlay_grid(rows, tmp_path / "grid.png"))
    assert (w, h) == (960, 500)  # 4 panels x 2.4 in, 2 rows x 2.4 in + 0.2 in, at 100 dpi
    seeded = [(t, im, ht, [("seed", m[0][1]), *m]) for t, im, ht, m in rows]
    w, h = png_size(viz.overlay_grid(seeded, tmp_path / "grid5.png"))
    assert (w, h) == (1200, 500)  # a fifth panel: the seed beside the refined mask
    assert viz.colorize(np.array([[0, 1, 255]], np.uint8)).tolist() == [[[0, 0, 0], [128, 0, 0], [224, 224, 192]]]


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
