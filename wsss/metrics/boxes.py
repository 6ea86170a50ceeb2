"""Box accuracy of CAMs: MaxBoxAcc and MaxBoxAccV2 (Choe et al., CVPR 2020, "Evaluating WSOL Methods Right").

The protocol of clovaai/wsolevaluation (`evaluation.py`: `compute_bboxes_from_scoremaps`, `BoxEvaluator`),
generalised from one object class per image to every (image, image-level class) pair:

- At each CAM threshold tau the binary map is `map >= tau`. Its components are the outer contours of OpenCV's
  `findContours` (8-connected foreground), each estimated box the contour's `boundingRect`.
- A pair's IoU at tau is the best IoU of an estimated box with any ground-truth box of that class. MaxBoxAcc
  takes the largest component only (largest `cv2.contourArea`, the reference's `max(contours,
  key=cv2.contourArea)`); MaxBoxAccV2 takes every component (the reference's `multi_contour_eval`).
- BoxAcc(tau, delta) = share of pairs whose IoU >= delta. MaxBoxAcc = max over tau of BoxAcc(tau, 0.5) with
  the largest component; MaxBoxAccV2 = mean over delta in (0.3, 0.5, 0.7) of max over tau of BoxAcc(tau,
  delta) with all components (each delta picks its own best tau, as the reference's `compute()` does).
- Boxes are inclusive pixel coordinates (x0, y0, x1, y1) and IoU counts pixels: area (x1 - x0 + 1) *
  (y1 - y0 + 1), the reference's "+1" convention (`calculate_multiple_iou`).

Where wsss differs from the reference (measured side by side in BENCHMARKS.md):

- The reference min-max normalises each map first (`normalize_scoremap`); wsss scores the maps as stored
  (IRN's per-class max normalisation: the maximum is 1, the minimum need not be 0).
- The reference thresholds a uint8 copy of the map, `uint8(255 * map) > int(tau * max)`; wsss compares the
  stored map with tau exactly (`map >= tau`), as the segmentation sweep does.
- The reference traces `RETR_TREE`, so with every component counted the bounding boxes of holes are
  candidates too; wsss counts only outer contours (a hole is not an object estimate).
- The reference's estimated box ends at x + w, one pixel past the component (clipped to W - 1); wsss ends it
  at x + w - 1, the component's last pixel, the same inclusive convention as the ground-truth boxes.
- An empty binary map gives the reference a box (0, 0, 0, 0); wsss gives no box, so that pair misses.
- A pair whose class has no ground-truth box in the image is left out of the accuracy and counted.

Per image the hits are kept as a (T, 4) count matrix (columns `HIT_COLUMNS`), so the bootstrap can resample
images and recompute every accuracy from sums.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import cv2
import numpy as np

BOX_DELTAS = (0.3, 0.5, 0.7)
# Columns of the per-image hit counts: MaxBoxAcc's largest component at IoU 0.5, then every component at each
# delta of MaxBoxAccV2.
HIT_COLUMNS = ("largest@0.5", "all@0.3", "all@0.5", "all@0.7")


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of `a` with every box of `b`, pixels counted inclusively ("+1" convention).

    Args:
        a: (Na, 4) boxes x0, y0, x1, y1 (inclusive pixel coordinates).
        b: (Nb, 4) boxes.

    Returns:
        (Na, Nb) float64 IoU in [0, 1].
    """
    a = np.asarray(a, np.int64).reshape(-1, 4)[:, None]  # (Na, 1, 4)
    b = np.asarray(b, np.int64).reshape(-1, 4)[None]  # (1, Nb, 4)
    iw = np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + 1
    ih = np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + 1
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area_a = (a[..., 2] - a[..., 0] + 1) * (a[..., 3] - a[..., 1] + 1)
    area_b = (b[..., 2] - b[..., 0] + 1) * (b[..., 3] - b[..., 1] + 1)
    return inter / (area_a + area_b - inter)


def threshold_levels(scores: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """Per pixel, how many thresholds are <= its score, so `score >= t_j` iff `level > j`; uint8 or uint16.

    Exact for the real numbers the floats denote: float16 and float32 scores are compared in float32 with
    each threshold rounded up to the next float32 (s >= t iff s >= that value, for any float32 s); other
    dtypes in float64.
    """
    th = np.asarray(thresholds, np.float64)
    if scores.dtype in (np.float16, np.float32):
        up = th.astype(np.float32)
        up = np.where(up < th, np.nextafter(up, np.float32(np.inf)), up)
        levels = np.searchsorted(up, scores.astype(np.float32, copy=False), side="right")
    else:
        levels = np.searchsorted(th, scores.astype(np.float64, copy=False), side="right")
    return levels.astype(np.uint8 if len(thresholds) < 255 else np.uint16)


def component_boxes(binary: np.ndarray) -> tuple[np.ndarray, int]:
    """Boxes of the outer contours of a binary map, and the index of the largest (by contour area).

    Args:
        binary: (H, W) uint8, nonzero = foreground.

    Returns:
        (n, 4) int64 inclusive boxes (n = 0 for an empty map) and the index of the first contour of the
        largest `cv2.contourArea` (-1 when n = 0).
    """
    contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return np.zeros((0, 4), np.int64), -1
    boxes = np.empty((len(contours), 4), np.int64)
    for i, c in enumerate(contours):
        x, y, w, h = cv2.boundingRect(c)
        boxes[i] = x, y, x + w - 1, y + h - 1
    if len(contours) == 1:
        return boxes, 0
    areas = [cv2.contourArea(c) for c in contours]
    return boxes, areas.index(max(areas))


def pair_ious(scores: np.ndarray, thresholds: Sequence[float], gt_boxes: np.ndarray) -> np.ndarray:
    """Best IoU with the ground-truth boxes at every threshold, for the largest and for any component.

    One pass over the thresholds: the map is binned once (`threshold_levels`); a threshold whose binary map
    equals the previous one (no score in between) reuses its boxes, and thresholds above the map's maximum
    give no box.

    Args:
        scores: (H, W) map of one class.
        thresholds: T increasing CAM thresholds.
        gt_boxes: (M, 4) inclusive ground-truth boxes of that class, M >= 1.

    Returns:
        (T, 2) float64: column 0 the largest component's IoU, column 1 the best IoU of any component (0 where
        `scores >= t` is empty).
    """
    levels = threshold_levels(np.asarray(scores), thresholds)
    counts = np.bincount(levels.ravel(), minlength=len(thresholds) + 1)
    top = int(np.flatnonzero(counts)[-1])  # thresholds 0..top-1 have a non-empty map
    out = np.zeros((len(thresholds), 2), np.float64)
    if top == 0:
        return out
    if levels.dtype != np.uint8:  # cv2.threshold takes 8-bit images only
        levels = levels.astype(np.float32)
    boxes, largest, owner = [], [], np.zeros(top, np.int64)  # boxes per distinct binary map
    x0, y0, x1, y1 = 0, 0, levels.shape[1] - 1, levels.shape[0] - 1  # holds every pixel with level > j
    for j in range(top):
        if j == 0 or counts[j] > 0:  # the map at t_j differs from the one at t_{j-1} only if a level equals j
            _, binary = cv2.threshold(levels[y0 : y1 + 1, x0 : x1 + 1], j, 255, cv2.THRESH_BINARY)  # level > j
            found, big = component_boxes(binary.astype(np.uint8, copy=False))
            found += (x0, y0, x0, y0)
            boxes.append(found)
            largest.append(big)
            # The map at a higher threshold lies inside this one's components: scan only their hull next.
            x0, y0 = found[:, :2].min(0)
            x1, y1 = found[:, 2:].max(0)
        owner[j] = len(boxes) - 1
    sizes = [len(b) for b in boxes]
    best = box_iou(np.concatenate(boxes), gt_boxes).max(1)  # (sum sizes,) best IoU of each estimated box
    starts = np.cumsum([0, *sizes[:-1]])
    per_map = np.stack([best[starts + np.asarray(largest)], np.maximum.reduceat(best, starts)], 1)  # (maps, 2)
    out[:top] = per_map[owner]
    return out


class BoxAccuracy:
    """MaxBoxAcc and MaxBoxAccV2 over (image, class) pairs, accumulated image by image.

    Args:
        thresholds: T increasing CAM thresholds in [0, 1].
    """

    def __init__(self, thresholds: Sequence[float]) -> None:
        self.thresholds = [float(t) for t in thresholds]
        self.hits = np.zeros((len(self.thresholds), len(HIT_COLUMNS)), np.int64)  # (T, 4)
        self.pairs = 0
        self.pairs_without_box = 0

    def image_hits(self, maps: np.ndarray, keys: Sequence[int], gt_boxes: Mapping[int, np.ndarray]) -> np.ndarray:
        """The (T, 4) hit counts of one image, also added to the totals (`score_image` leaves them alone).

        Args:
            maps: (K, H, W) maps of the image's classes.
            keys: (K,) class index of each map.
            gt_boxes: class index -> (M, 4) inclusive ground-truth boxes of that class in the image.
        """
        hits, pairs, without_box = self.score_image(maps, keys, gt_boxes)
        self.add(hits, pairs, without_box)
        return hits

    def score_image(
        self, maps: np.ndarray, keys: Sequence[int], gt_boxes: Mapping[int, np.ndarray]
    ) -> tuple[np.ndarray, int, int]:
        """(T, 4) hits, scored pairs and pairs without a box of one image, totals untouched (thread-safe)."""
        hits = np.zeros_like(self.hits)
        pairs = without_box = 0
        for k, c in enumerate(keys):
            gt = np.asarray(gt_boxes.get(int(c), np.zeros((0, 4))), np.int64).reshape(-1, 4)
            if not len(gt):
                without_box += 1
                continue
            iou = pair_ious(np.asarray(maps[k]), self.thresholds, gt)  # (T, 2)
            hits[:, 0] += iou[:, 0] >= 0.5
            for d, delta in enumerate(BOX_DELTAS):
                hits[:, 1 + d] += iou[:, 1] >= delta
            pairs += 1
        return hits, pairs, without_box

    def add(self, hits: np.ndarray, pairs: int, without_box: int = 0) -> None:
        """Add one image's `score_image` to the totals."""
        self.hits += hits
        self.pairs += pairs
        self.pairs_without_box += without_box

    def compute(self) -> dict:
        """Accuracies in percent: see `box_scores`."""
        return box_scores(self.hits, self.pairs, self.thresholds) | {"pairs_without_box": self.pairs_without_box}


def box_scores(hits: np.ndarray, pairs: int, thresholds: Sequence[float]) -> dict:
    """MaxBoxAcc, MaxBoxAccV2, their best thresholds and curves from summed hits.

    Args:
        hits: (T, 4) summed hit counts (columns `HIT_COLUMNS`).
        pairs: Number of scored (image, class) pairs.
        thresholds: The T thresholds.

    Returns:
        `maxboxacc`, `maxboxacc_threshold`, `maxboxacc_v2`, `v2_per_delta` ({delta: [acc, threshold]}),
        `curves` ({column: T accuracies}), `pairs`. Accuracies are NaN without pairs.
    """
    acc = 100.0 * hits / pairs if pairs else np.full(hits.shape, np.nan)
    best = acc.argmax(0) if pairs else np.zeros(hits.shape[1], np.int64)  # first maximum per column
    t = [float(thresholds[i]) for i in best]
    v2 = {str(d): [float(acc[best[1 + i], 1 + i]), t[1 + i]] for i, d in enumerate(BOX_DELTAS)}
    return {
        "maxboxacc": float(acc[best[0], 0]),
        "maxboxacc_threshold": t[0],
        "maxboxacc_v2": float(np.mean([acc[best[1 + i], 1 + i] for i in range(len(BOX_DELTAS))])),
        "v2_per_delta": v2,
        "curves": {name: acc[:, i].tolist() for i, name in enumerate(HIT_COLUMNS)},
        "pairs": int(pairs),
    }
