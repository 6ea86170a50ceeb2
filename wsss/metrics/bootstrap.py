"""What each image contributes to the scores, and bootstrap confidence intervals over images.

Every reported metric is a function of sums over images (confusion counts, PxAP histograms, box hits), so a
bootstrap resample is a vector of image multiplicities w (N,) and the resampled metric is the same function
of the w-weighted sums: the ratio of sums is recomputed, per-image scores are never averaged. All B resamples
are one matrix product W (B, N) @ stats (N, F) per statistic, chunked over B.

Per image (`ImageStats`, saved as `per_image.npz` beside metrics.json):

- `masks` (N, L, 3): TP, FP, FN per label of the written masks (the headline mIoU);
- the sweep, sparse over labels: for each image the labels it can count (background, its ground-truth labels,
  its keys), each with its ground-truth pixel count and, per threshold, TP and predicted pixels;
- `pxap` (N, 2, n+1): class-agnostic PxAP score histograms [negative, positive] (ignored pixels left out);
- `box_hits` (N, T, 4) and `box_pairs` (N,): the box metrics' hit counts (`wsss.metrics.boxes.HIT_COLUMNS`).

Intervals are percentile intervals of the B resampled values. Two runs scored on the same images in the
same order share W (same seed), so their difference is paired resample by resample.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from wsss.artifacts import atomic_open
from wsss.metrics.boxes import BOX_DELTAS

# The metrics the bootstrap resamples, in table order.
BOOTSTRAP_METRICS = ("miou", "sweep_best_miou", "pxap", "maxboxacc", "maxboxacc_v2")
_CHUNK = 100  # resamples per matrix product: bounds memory at COCO's 81 labels x 96 thresholds


@dataclass
class ImageStats:
    """Per-image counts of one evaluation, in image order; absent parts are None."""

    ids: list[str]
    thresholds: np.ndarray  # (T,) float64, the sweep's and the box metrics' thresholds
    masks: np.ndarray | None = None  # (N, L, 3) int32 [TP, FP, FN]
    sweep_offsets: np.ndarray | None = None  # (N + 1,) rows of image i: offsets[i]:offsets[i+1]
    sweep_labels: np.ndarray | None = None  # (M,) label of each row
    sweep_gt: np.ndarray | None = None  # (M,) ground-truth pixels of that label
    sweep_tp: np.ndarray | None = None  # (M, T) true positives per threshold
    sweep_pred: np.ndarray | None = None  # (M, T) predicted pixels per threshold
    pxap: np.ndarray | None = None  # (N, 2, n+1) [negative, positive] score histograms
    box_hits: np.ndarray | None = None  # (N, T, 4)
    box_pairs: np.ndarray | None = None  # (N,)
    num_labels: int = 0
    # The resampled values evaluate computed (`store_resampled`), so a report with the same resamples reads them.
    resampled: np.ndarray | None = None  # (len(resampled_metrics), B) float64
    resampled_metrics: np.ndarray | None = None  # metric names
    resampled_seed: int = -1
    resampled_miou_at: int = -1  # the sweep index `miou` was taken at, -1 for the written masks

    def store_resampled(self, values: dict[str, np.ndarray], seed: int, miou_at: int | None) -> None:
        """Keep the resampled metric values of `resample_weights(N, B, seed)` (see `cached_resampled`)."""
        self.resampled_metrics = np.array(list(values))
        self.resampled = np.stack(list(values.values())) if values else np.zeros((0, 0))
        self.resampled_seed = int(seed)
        self.resampled_miou_at = -1 if miou_at is None else int(miou_at)

    def cached_resampled(self, num_resamples: int, seed: int, miou_at: int | None) -> dict[str, np.ndarray] | None:
        """The stored resampled values if they were made with these resamples, else None."""
        if self.resampled is None or self.resampled_seed != seed or self.resampled.shape[-1] != num_resamples:
            return None
        if self.resampled_miou_at != (-1 if miou_at is None else miou_at):
            return None
        return {str(k): v for k, v in zip(self.resampled_metrics, self.resampled, strict=True)}

    def save(self, path: str | Path) -> None:
        """Write a compressed npz (via a temp file, so a killed write leaves nothing a rerun trusts)."""
        arrays = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
        arrays["ids"] = np.array(self.ids)
        for k in ("num_labels", "resampled_seed", "resampled_miou_at"):
            arrays[k] = np.array(getattr(self, k))
        with atomic_open(path, "wb") as f:
            np.savez_compressed(f, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> ImageStats:
        """Read what `save` wrote."""
        with np.load(path, allow_pickle=False) as z:
            kw = {k: z[k] for k in z.files}
        kw["ids"] = [str(i) for i in kw["ids"]]
        for k in ("num_labels", "resampled_seed", "resampled_miou_at"):
            if k in kw:
                kw[k] = int(kw[k])
        return cls(**kw)

    @property
    def num_images(self) -> int:
        return len(self.ids)


@dataclass
class ImageStatsBuilder:
    """Collects `ImageStats` image by image during the evaluation pass."""

    num_labels: int
    thresholds: Sequence[float]
    ids: list[str] = field(default_factory=list)
    _parts: dict[str, list] = field(default_factory=dict)

    def add(
        self,
        image_id: str,
        masks_cm: Tensor | None = None,
        sweep_hist: Tensor | None = None,
        pxap_hist: Tensor | None = None,
        box_hits: np.ndarray | None = None,
        box_pairs: int = 0,
    ) -> None:
        """One image (see `image_record` for the arguments)."""
        self.add_record(image_id, image_record(masks_cm, sweep_hist, pxap_hist, box_hits, box_pairs))

    def add_record(self, image_id: str, record: dict) -> None:
        """One image's `image_record`."""
        self.ids.append(image_id)
        for name, value in record.items():
            self._parts.setdefault(name, []).append(value)

    def build(self) -> ImageStats:
        """The collected statistics (a part given for no image is None)."""
        p = self._parts
        out = ImageStats(list(self.ids), np.asarray(self.thresholds, np.float64), num_labels=self.num_labels)
        if "masks" in p:
            out.masks = np.stack(p["masks"])
        if "sweep" in p:
            rows = p["sweep"]
            out.sweep_offsets = np.cumsum([0, *(len(r[0]) for r in rows)]).astype(np.int64)
            out.sweep_labels = np.concatenate([r[0] for r in rows]).astype(np.int16)
            out.sweep_gt = np.concatenate([r[1] for r in rows])
            out.sweep_tp = np.concatenate([r[2] for r in rows])
            out.sweep_pred = np.concatenate([r[3] for r in rows])
        if "pxap" in p:
            out.pxap = np.stack(p["pxap"])
        if "box_hits" in p:
            out.box_hits = np.stack(p["box_hits"])
            out.box_pairs = np.asarray(p["box_pairs"], np.uint8)
        return out


def image_record(
    masks_cm: Tensor | None = None,
    sweep_hist: Tensor | None = None,
    pxap_hist: Tensor | None = None,
    box_hits: np.ndarray | None = None,
    box_pairs: int = 0,
) -> dict:
    """What one image contributes, in compact form (kept per image, gathered across ranks).

    Args:
        masks_cm: (L, L) confusion matrix of the image's written mask.
        sweep_hist: (L, L, T+1) sweep counts of the image (`ThresholdSweep.last_hist`).
        pxap_hist: (3, n+1) class-agnostic PxAP counts (`ThresholdSweep.last_pxap_hist`).
        box_hits: (T, 4) box hits (`BoxAccuracy.image_hits`).
        box_pairs: The image's scored (image, class) pairs.
    """
    # Stored narrow: one image's pixel counts fit int32 (at most 2^31 - 1 pixels; the reader's cap is 5e7), and
    # its hits and pairs are at most its classes (<= 254), so uint8.
    rec: dict = {}
    if masks_cm is not None:
        cm = masks_cm.cpu().to(torch.int64)
        tp = cm.diagonal()
        rec["masks"] = torch.stack([tp, cm.sum(0) - tp, cm.sum(1) - tp], 1).numpy().astype(np.int32)
    if sweep_hist is not None:
        labels, gt, tp, pred = sweep_rows(sweep_hist)
        rec["sweep"] = (labels, gt.astype(np.int32), tp.astype(np.int32), pred.astype(np.int32))
    if pxap_hist is not None:
        rec["pxap"] = pxap_hist[:2].cpu().numpy().astype(np.int32)
    if box_hits is not None:
        rec["box_hits"] = np.asarray(box_hits).astype(np.uint8)
        rec["box_pairs"] = int(box_pairs)
    return rec


def sweep_rows(hist: Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The labels one image can count, from its (L, L, T+1) [gt, winner, bin] sweep counts.

    The image's confusion matrix at threshold j (as `ThresholdSweep.compute` builds it) has, for a
    foreground label f, TP = fg[f, f, j] and predicted = sum_g fg[g, f, j], with fg[g, f, j] the pixels of bins
    above j; background takes every pixel no foreground label took.

    Returns:
        labels (A,), gt pixels (A,), TP (A, T), predicted (A, T), int64; A = labels with a ground-truth or a
        predicted pixel at some threshold (background first).
    """
    hist = hist.cpu().to(torch.int64)
    fg = hist.flip(-1).cumsum(-1).flip(-1)[..., 1:]  # (L, L, T) pixels of (gt, winner) foreground at t_j
    gt = hist.sum((1, 2))  # (L,)
    pred = fg.sum(0)  # (L, T) predicted pixels of each foreground label (column 0 is always empty)
    tp = fg.diagonal(dim1=0, dim2=1).T.clone()  # (L, T)
    pred[0] = gt.sum() - pred[1:].sum(0)
    tp[0] = gt[0] - fg[0, 1:].sum(0)
    active = torch.nonzero((gt > 0) | (pred > 0).any(1)).flatten()
    return active.numpy(), gt[active].numpy(), tp[active].numpy(), pred[active].numpy()


def resample_weights(num_images: int, num_resamples: int, seed: int) -> np.ndarray:
    """(B, N) float64 multiplicities of B bootstrap resamples of N images (draw b = N indices with replacement).

    Resample b draws `numpy.random.default_rng(seed).integers(0, N, (B, N))[b]`; its multiplicities are the
    counts of each index in that row.
    """
    if num_images < 1:
        raise ValueError(f"bootstrap needs at least one image, got {num_images}")
    draws = np.random.default_rng(seed).integers(0, num_images, (num_resamples, num_images))
    flat = draws + (np.arange(num_resamples) * num_images)[:, None]
    counts = np.bincount(flat.ravel(), minlength=num_resamples * num_images)
    return counts.reshape(num_resamples, num_images).astype(np.float64)


def _nanmean(x: np.ndarray, axis: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows stay NaN
        return np.nanmean(x, axis)


def _miou(tp: np.ndarray, union: np.ndarray) -> np.ndarray:
    """Mean over the last axis of 100 TP / union, labels with union 0 left out (as `scores`)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, 100.0 * tp / np.where(union > 0, union, 1), np.nan)
    return _nanmean(iou, -1)


def _sweep_sums(s: ImageStats, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Resampled (B, L, T) TP, predicted and (B, L, 1) ground-truth sums of the sweep."""
    n, L, T = s.num_images, s.num_labels, len(s.thresholds)
    image_of_row = np.repeat(np.arange(n), np.diff(s.sweep_offsets))
    tp = np.zeros((len(w), L, T))
    pred = np.zeros((len(w), L, T))
    gt = np.zeros((len(w), L, 1))
    for label in np.unique(s.sweep_labels):
        rows = np.flatnonzero(s.sweep_labels == label)
        wl = w[:, image_of_row[rows]]  # (B, rows): an image holds each label in at most one row
        tp[:, label] = wl @ s.sweep_tp[rows].astype(np.float64)
        pred[:, label] = wl @ s.sweep_pred[rows].astype(np.float64)
        gt[:, label, 0] = wl @ s.sweep_gt[rows].astype(np.float64)
    return tp, pred, gt


def _pixel_ap_cumulative(tp: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """`wsss.metrics.pxap.pixel_ap` from pixels at or above each threshold (B, n+1) instead of histograms."""
    predicted = tp + fp
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(predicted > 0, tp / np.where(predicted > 0, predicted, 1), 0.0)
        recall = tp / tp[:, :1]  # NaN where there are no positives
    drop = recall - np.concatenate([recall[:, 1:], np.zeros_like(recall[:, :1])], 1)  # R_i - R_{i+1}
    return 100.0 * (drop * precision).sum(1)


def resampled_metrics(s: ImageStats, weights: np.ndarray, miou_at: int | None = None) -> dict[str, np.ndarray]:
    """Every metric of `BOOTSTRAP_METRICS` that `s` can give, for each row of image multiplicities.

    Args:
        s: Per-image statistics of one evaluation.
        weights: (B, N) image multiplicities (a row of ones gives the full-sample value).
        miou_at: Report `miou` at this sweep threshold index instead of the written masks' (a threshold
            chosen on another split).

    Returns:
        metric -> (B,) float64 (percent; NaN where undefined).
    """
    weights = np.asarray(weights, np.float64)
    if weights.ndim != 2 or weights.shape[1] != s.num_images:
        raise ValueError(f"weights must be (B, {s.num_images}), got {weights.shape}")
    n = s.num_images
    f64 = lambda a: None if a is None else a.reshape(n, -1).astype(np.float64)  # noqa: E731  BLAS operands
    masks, box_hits = f64(s.masks), f64(s.box_hits)
    # Pixels at or above each PxAP threshold, per image: the sums of a resample are linear in these, so the
    # reverse cumulative sum is taken once per image instead of once per resample.
    pxap = None if s.pxap is None else f64(np.cumsum(s.pxap[..., ::-1], -1)[..., ::-1])
    box_pairs = None if s.box_pairs is None else s.box_pairs.astype(np.float64)
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(weights), _CHUNK):
        w = weights[start : start + _CHUNK]
        out: dict[str, np.ndarray] = {}
        if s.masks is not None:
            sums = (w @ masks).reshape(len(w), -1, 3)  # (B, L, 3)
            out["miou"] = _miou(sums[..., 0], sums.sum(-1))
        if s.sweep_tp is not None:
            tp, pred, gt = _sweep_sums(s, w)
            curve = _miou(np.moveaxis(tp, 1, 2), np.moveaxis(gt + pred - tp, 1, 2))  # (B, T)
            if miou_at is not None:
                out["miou"] = curve[:, miou_at]
            best = np.nan_to_num(curve, nan=-np.inf).max(1)
            out["sweep_best_miou"] = np.where(np.isfinite(best), best, np.nan)
        if s.pxap is not None:
            above = (w @ pxap).reshape(len(w), 2, -1)  # (B, [negative, positive], n+1)
            out["pxap"] = _pixel_ap_cumulative(above[:, 1], above[:, 0])
        if s.box_hits is not None:
            pairs = w @ box_pairs  # (B,)
            hits = (w @ box_hits).reshape(len(w), -1, 4)  # (B, T, 4)
            with np.errstate(invalid="ignore", divide="ignore"):
                acc = 100.0 * hits / pairs[:, None, None]
            best = acc.max(1)  # (B, 4)
            out["maxboxacc"] = best[:, 0]
            out["maxboxacc_v2"] = best[:, 1 : 1 + len(BOX_DELTAS)].mean(1)
        for k, v in out.items():
            parts.setdefault(k, []).append(v)
    return {k: np.concatenate(parts[k]) for k in BOOTSTRAP_METRICS if k in parts}


def interval(values: np.ndarray, level: float = 0.95) -> list[float]:
    """The percentile interval [lo, hi] holding `level` of the resampled values (NaN resamples dropped)."""
    alpha = 100.0 * (1.0 - level) / 2.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        lo, hi = np.nanpercentile(values, [alpha, 100.0 - alpha])
    return [float(lo), float(hi)]


def bootstrap_intervals(s: ImageStats, num_resamples: int, seed: int, level: float = 0.95) -> dict[str, list[float]]:
    """Percentile intervals of every metric `s` can give, from `num_resamples` resamples of its images."""
    values = resampled_metrics(s, resample_weights(s.num_images, num_resamples, seed))
    return {k: interval(v, level) for k, v in values.items()}
