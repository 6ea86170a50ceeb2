"""Evaluation maths: confusion matrices, mIoU and friends, single-pass threshold sweeps and pixel AP.

Conventions (shared with `wsss.data`): `num_labels` is L = C + 1; label 0 is background, c + 1 is
foreground class c, 255 is ignore. A CAM of one image is `keys` (K,) foreground class indices (its image-level
labels) and `maps` (K, H, W) scores in [0, 1].

The IRN pseudo mask at background threshold t is `argmax([t, maps_0, ..., maps_{K-1}])` with ties to the
first entry, so a pixel is foreground iff its best map value is strictly above t (a tie goes to background),
and among equal maps the lowest k wins (as `np.argmax`). Thresholds are compared exactly as the real numbers
the floats denote, whatever the maps' dtype: t is rounded down to that dtype once, never to nearest (so
float32(0.3) = 0.30000001 is above t = 0.3, a tie only with t = float32(0.3)).

Everything runs in torch on the tensors' device. Per image the hot path is a handful of element-wise ops and
one `torch.bincount`; there is no Python loop over pixels, classes or thresholds. Accumulators sum across
ranks with `all_reduce` in `compute()` when `torch.distributed` is initialised, so every rank must call it.
"""

from wsss.metrics.bootstrap import (
    BOOTSTRAP_METRICS,
    ImageStats,
    ImageStatsBuilder,
    bootstrap_intervals,
    image_record,
    interval,
    resample_weights,
    resampled_metrics,
)
from wsss.metrics.boxes import BOX_DELTAS, HIT_COLUMNS, BoxAccuracy, box_iou, box_scores, pair_ious
from wsss.metrics.confusion import ConfusionMatrix, confusion_matrix
from wsss.metrics.pxap import pixel_ap
from wsss.metrics.scores import MAXIMISABLE, PER_LABEL_KEYS, SCALAR_KEYS, best_threshold, scores, threshold_curves
from wsss.metrics.sweep import ThresholdSweep
from wsss.metrics.thresholds import check_thresholds, parse_thresholds

__all__ = [
    "BOOTSTRAP_METRICS",
    "BOX_DELTAS",
    "HIT_COLUMNS",
    "MAXIMISABLE",
    "PER_LABEL_KEYS",
    "SCALAR_KEYS",
    "BoxAccuracy",
    "ConfusionMatrix",
    "ImageStats",
    "ImageStatsBuilder",
    "ThresholdSweep",
    "best_threshold",
    "bootstrap_intervals",
    "box_iou",
    "box_scores",
    "check_thresholds",
    "confusion_matrix",
    "image_record",
    "interval",
    "pair_ious",
    "parse_thresholds",
    "pixel_ap",
    "resample_weights",
    "resampled_metrics",
    "scores",
    "threshold_curves",
]
