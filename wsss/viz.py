"""Plots and overlays of evaluation results, written as PNG files, plus a Markdown score table.

Figures are drawn on matplotlib's Agg canvas through `matplotlib.figure.Figure` (no pyplot, no display, no
global backend switch), at fixed sizes, and saved through `atomic_open`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from wsss.artifacts import atomic_open, voc_colormap

log = logging.getLogger(__name__)

DPI = 100
_VOC = voc_colormap()  # (256, 3) uint8; 255 (ignore) is (224, 224, 192)


def _save(fig: Figure, path: str | Path) -> Path:
    """Render `fig` to PNG at `path`, atomically."""
    path = Path(path)
    FigureCanvasAgg(fig)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=DPI)
    log.debug("wrote %s", path)
    return path


def _floats(values: Sequence[float | None]) -> np.ndarray:
    """Values as float64, None -> NaN."""
    return np.array([math.nan if v is None else float(v) for v in values], np.float64)


def plot_threshold_curve(
    thresholds: Sequence[float],
    curves: Mapping[str, Sequence[float | None]],
    best_t: float | None,
    path: str | Path,
) -> Path:
    """Metric curves (e.g. mIoU, precision, recall in percent) against the background threshold.

    Args:
        thresholds: The T thresholds (x axis).
        curves: Name -> T values in percent (NaN or None where undefined).
        best_t: Threshold to mark with a vertical line, or None.
        path: Output PNG (640 x 420 pixels).

    Returns:
        `path`.
    """
    return _save(threshold_curve_figure(thresholds, curves, best_t), path)


def threshold_curve_figure(
    thresholds: Sequence[float], curves: Mapping[str, Sequence[float | None]], best_t: float | None
) -> Figure:
    """The figure `plot_threshold_curve` saves: one line per curve, in order, then the `best_t` line."""
    x = np.asarray(thresholds, np.float64)
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for name, values in curves.items():
        y = _floats(values)
        if y.shape != x.shape:
            raise ValueError(f"curve {name!r} has {len(y)} values for {len(x)} thresholds")
        ax.plot(x, y, label=name, linewidth=1.6)
    if best_t is not None:
        ax.axvline(best_t, color="0.3", linestyle="--", linewidth=1, label=f"best t = {best_t:g}")
    ax.set_xlabel("background threshold")
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    return fig


def plot_class_iou(class_names: Sequence[str], iou: Sequence[float | None], path: str | Path) -> Path:
    """Per-class IoU as bars, with the mean over defined values as a line; NaN classes are marked n/a.

    Args:
        class_names: One name per bar (e.g. background + the C classes).
        iou: IoU in percent per name (NaN or None for absent classes).
        path: Output PNG, 400 pixels high and 0.32 inch per class wide (at least 640 pixels).

    Returns:
        `path`.
    """
    return _save(class_iou_figure(class_names, iou), path)


def class_iou_figure(class_names: Sequence[str], iou: Sequence[float | None]) -> Figure:
    """The figure `plot_class_iou` saves: one bar per class (0 for NaN), the mean as a horizontal line."""
    values = _floats(iou)
    if len(values) != len(class_names):
        raise ValueError(f"{len(values)} IoU values for {len(class_names)} class names")
    n = len(class_names)
    fig = Figure(figsize=(max(6.4, 0.32 * n + 1.2), 4.0), layout="constrained")
    ax = fig.add_subplot()
    pos = np.arange(n)
    colours = _VOC[np.arange(n) % 256] / 255.0
    ax.bar(pos, np.nan_to_num(values), color=colours, edgecolor="0.2", linewidth=0.5)
    for i in np.flatnonzero(np.isnan(values)):
        ax.text(i, 1, "n/a", ha="center", va="bottom", fontsize="x-small", rotation=90)
    if np.isfinite(values).any():
        mean = float(np.nanmean(values))
        ax.axhline(mean, color="0.3", linestyle="--", linewidth=1, label=f"mean {mean:.1f}")
        ax.legend(loc="upper right", fontsize="small")
    ax.set_xticks(pos, list(class_names), rotation=60, ha="right", fontsize="small")
    ax.set_ylabel("IoU (%)")
    ax.set_ylim(0, 100)
    ax.set_xlim(-0.6, n - 0.4)
    ax.grid(axis="y", alpha=0.3)
    return fig


def plot_training_curves(history: Sequence[Mapping[str, float]], path: str | Path) -> Path:
    """One panel per logged quantity (loss, accuracy, pair counts ...) over the epochs."""
    keys = [k for k in history[0] if k not in ("epoch", "lr", "seconds")] if history else []
    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(3.2 * max(len(keys), 1) + 1, 3.2))
    axes = fig.subplots(1, max(len(keys), 1), squeeze=False)[0]
    for ax, key in zip(axes, keys, strict=False):
        ax.plot(epochs, [h[key] for h in history], marker=".")
        ax.set(xlabel="epoch", title=key)
        ax.grid(alpha=0.3)
    return _save(fig, path)


def colorize(mask: np.ndarray) -> np.ndarray:
    """(H, W) uint8 labels -> (H, W, 3) uint8 VOC colours (255, ignore, is light grey)."""
    return _VOC[np.asarray(mask, np.uint8)]


def overlay_strip(
    image: np.ndarray, heats: Sequence[tuple[str, np.ndarray]], masks: Sequence[tuple[str, np.ndarray]]
) -> np.ndarray:
    """One image's panels side by side under their titles, drawn with OpenCV (fast enough for every image).

    Args:
        image: (H, W, 3) uint8 RGB.
        heats: (class name, (H, W) map in [0, 1]) per class: each drawn as a jet heat map over the image, half
            and half, as in `overlay_grid`.
        masks: (name, (H, W) uint8 label map) per mask, in VOC colours.

    Returns:
        (title + H, W * panels, 3) uint8 RGB, a white title strip above each panel.
    """
    import cv2

    image = np.asarray(image, np.uint8)
    h, w = image.shape[:2]
    panels = [("image", image)]
    for name, heat in heats:
        level = (np.clip(np.asarray(heat, np.float32), 0, 1) * 255).round().astype(np.uint8)
        jet = cv2.applyColorMap(level, cv2.COLORMAP_JET)[..., ::-1]  # OpenCV's BGR -> RGB
        panels.append((name, ((image.astype(np.uint16) + jet) // 2).astype(np.uint8)))
    panels += [(name, colorize(m)) for name, m in masks]
    title = max(12, min(28, w // 8))
    out = np.full((title + h, w * len(panels), 3), 255, np.uint8)
    for i, (name, rgb) in enumerate(panels):
        out[title:, i * w : (i + 1) * w] = rgb
        cv2.putText(out, name, (i * w + 2, title - 4), cv2.FONT_HERSHEY_SIMPLEX, title / 40, (0, 0, 0), 1, cv2.LINE_AA)
    return out


def encode_jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    """(H, W, 3) uint8 RGB as JPEG bytes."""
    import cv2

    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError(f"cannot encode a {rgb.shape} image as JPEG")
    return buf.tobytes()


def overlay_grid(
    rows: Sequence[tuple[str, np.ndarray, np.ndarray, Sequence[tuple[str, np.ndarray]]]], path: str | Path
) -> Path:
    """A grid of examples, one row each: image | heat map over image | one panel per label map.

    Args:
        rows: (title, image (H, W, 3) uint8, heat (H, W) float in [0, 1], [(name, label map (H, W) uint8), ...])
            per row, e.g. the pseudo mask and the ground truth, or seed, refined mask and ground truth; every
            row has the same panels; sizes may differ between rows.
        path: Output PNG: panels of 2.4 inches (240 pixels) wide, each row 2.4 inches high plus a title.

    Returns:
        `path`.
    """
    return _save(overlay_grid_figure(rows), path)


def overlay_grid_figure(
    rows: Sequence[tuple[str, np.ndarray, np.ndarray, Sequence[tuple[str, np.ndarray]]]],
) -> Figure:
    """The figure `overlay_grid` saves: `fig.axes[r * cols + c]` shows row r's panel c, an image each."""
    if not rows:
        raise ValueError("overlay_grid needs at least one row")
    cols = 2 + len(rows[0][3])
    fig = Figure(figsize=(cols * 2.4, len(rows) * 2.4 + 0.2), layout="constrained")
    axes = fig.subplots(len(rows), cols, squeeze=False)
    for r, (title, image, heat, masks) in enumerate(rows):
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"row {r} ({title}): image must be (H, W, 3), got {image.shape}")
        if len(masks) != cols - 2:
            raise ValueError(f"row {r} ({title}): {len(masks)} label maps, the first row has {cols - 2}")
        panels = [
            ("image", image, None),
            ("CAM", image, np.clip(np.asarray(heat, np.float32), 0, 1)),
            *[(name, colorize(m), None) for name, m in masks],
        ]
        for c, (name, rgb, over) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(rgb, interpolation="nearest")
            if over is not None:
                ax.imshow(over, cmap="jet", alpha=0.5, vmin=0, vmax=1, interpolation="bilinear")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{title}" if c == 0 else name, fontsize="small", loc="left" if c == 0 else "center")
    return fig


def _per_label(scores: Mapping[str, Any], key: str, names: Sequence[str]) -> list[float | None]:
    """Per-label values of `key`: from a list in label order, or from a dict keyed by label name."""
    values = scores.get(key)
    if values is None:
        return [None] * len(names)
    if isinstance(values, Mapping):
        return [values.get(n) for n in names]
    return list(values)


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{float(value):.2f}"


def markdown_table(class_names: Sequence[str], scores: Mapping[str, Any]) -> str:
    """A Markdown table of per-class IoU, precision, recall, FP and FN ratios, and a mean row.

    Args:
        class_names: The L label names (background first), or the C foreground names, in which case
            "background" is prepended.
        scores: A `wsss.metrics.scores` dict (per-label lists), or one whose per-label entries are dicts
            keyed by label name; NaN or None prints as "–".

    Returns:
        The table, with a last line giving mIoU (and foreground mIoU when present).
    """
    names = list(class_names)
    iou = scores.get("iou")
    if iou is not None and not isinstance(iou, Mapping) and len(iou) == len(names) + 1:
        names = ["background", *names]
    keys = ("iou", "precision", "recall", "fp_ratio", "fn_ratio")
    columns = {k: _per_label(scores, k, names) for k in keys}
    for k, values in columns.items():
        if len(values) != len(names):
            raise ValueError(f"scores[{k!r}] has {len(values)} values for {len(names)} labels")
    lines = ["| class | IoU | precision | recall | FP | FN |", "|---|---:|---:|---:|---:|---:|"]
    for i, name in enumerate(names):
        lines.append(f"| {name} | " + " | ".join(_cell(columns[k][i]) for k in keys) + " |")
    means = ("miou", "mprecision", "mrecall", "mfp_ratio", "mfn_ratio")
    lines.append("| **mean** | " + " | ".join(f"**{_cell(scores.get(k))}**" for k in means) + " |")
    tail = f"mIoU {_cell(scores.get('miou'))}"
    if scores.get("fg_miou") is not None:
        tail += f", foreground mIoU {_cell(scores.get('fg_miou'))}"
    return "\n".join(lines) + "\n\n" + tail
