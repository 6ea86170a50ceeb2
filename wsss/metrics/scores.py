"""Scores of confusion matrices: IoU, precision, recall, FP/FN ratios, their means; threshold curves."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

# Scalar keys of `scores` (percent unless noted), in the order tables print them.
SCALAR_KEYS: tuple[str, ...] = (
    "miou",
    "fg_miou",
    "mprecision",
    "mrecall",
    "mfp_ratio",
    "mfn_ratio",
    "pixel_accuracy",
    "fg_precision",
    "fg_recall",
    "pred_fg_on_gt_bg",
)
# Per-label keys of `scores`: lists of L values, index 0 = background, NaN where undefined.
PER_LABEL_KEYS: tuple[str, ...] = ("iou", "precision", "recall", "fp_ratio", "fn_ratio")
# Metrics where larger is better, the ones `best_threshold` may maximise.
MAXIMISABLE: tuple[str, ...] = (
    "miou",
    "fg_miou",
    "mprecision",
    "mrecall",
    "pixel_accuracy",
    "fg_precision",
    "fg_recall",
)


def _score_tensors(cm: Tensor) -> dict[str, Tensor]:
    """All metrics of `scores` for a stack (..., L, L) as float64 tensors (..., L) or (...,)."""
    cm = cm.to(torch.float64)
    tp = cm.diagonal(dim1=-2, dim2=-1)  # (..., L)
    gt = cm.sum(-1)  # (..., L) pixels per ground-truth label
    pred = cm.sum(-2)  # (..., L) pixels per predicted label
    union = gt + pred - tp
    fp, fn = pred - tp, gt - tp
    # 0 / 0 is NaN in float64 torch: the "undefined" of each ratio (no numerator exceeds its denominator).
    out = {
        "iou": 100.0 * tp / union,
        "precision": 100.0 * tp / pred,
        "recall": 100.0 * tp / gt,
        "fp_ratio": 100.0 * fp / union,
        "fn_ratio": 100.0 * fn / union,
    }
    pred_fg = pred[..., 1:].sum(-1)
    fg_hit = cm[..., 1:, 1:].sum((-2, -1))  # foreground predicted as any foreground class
    out.update(
        miou=torch.nanmean(out["iou"], -1),
        fg_miou=torch.nanmean(out["iou"][..., 1:], -1),
        mprecision=torch.nanmean(out["precision"], -1),
        mrecall=torch.nanmean(out["recall"], -1),
        mfp_ratio=torch.nanmean(out["fp_ratio"], -1),
        mfn_ratio=torch.nanmean(out["fn_ratio"], -1),
        pixel_accuracy=100.0 * tp.sum(-1) / cm.sum((-2, -1)),
        fg_precision=100.0 * fg_hit / pred_fg,
        fg_recall=100.0 * fg_hit / gt[..., 1:].sum(-1),
        pred_fg_on_gt_bg=100.0 * cm[..., 0, 1:].sum(-1) / pred_fg,
    )
    out["union"] = union
    return out


def scores(cm: Tensor) -> dict:
    """Segmentation scores of a confusion matrix, in percent, as plain Python values.

    Per label l (lists of L values, index 0 = background), with TP = cm[l, l], FP = column sum - TP,
    FN = row sum - TP, union = TP + FP + FN:

    - `iou` TP/union, `precision` TP/(TP+FP), `recall` TP/(TP+FN);
    - `fp_ratio` FP/union and `fn_ratio` FN/union, the FP and FN columns of WSSS tables (IRN-family
      `eval_cam.py`: `fp = 1 - gt/union`, `fn = 1 - pred/union`), so iou + fp_ratio + fn_ratio = 100.

    Absent labels (no pixel in ground truth or prediction, union = 0) have NaN IoU, FP and FN ratios and are
    left out of every mean, as mmseg (`nanmean`) and detectron2 (`acc_valid`/`iou_valid`) do; `absent` lists
    them. Likewise precision is NaN for a label never predicted and recall for a label absent from the ground
    truth, and each mean skips its NaNs.

    Scalars: `miou` (mean IoU over present labels, background included), `fg_miou` (over present
    classes 1..C), `mprecision`, `mrecall`, `mfp_ratio`, `mfn_ratio` (means over labels where defined, so
    miou + mfp_ratio + mfn_ratio = 100), `pixel_accuracy` (trace / total), `fg_precision` and `fg_recall`
    (class-agnostic: foreground predicted as any class vs ground-truth foreground), `pred_fg_on_gt_bg`
    (share of predicted foreground whose ground truth is background = 100 - fg_precision),
    `num_pixels` (int, scored pixels) and `absent` (list of labels).

    Args:
        cm: (L, L) confusion matrix, rows ground truth, columns prediction.

    Returns:
        A dict with the keys above; floats may be NaN.
    """
    if cm.dim() != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion matrix must be (L, L), got {tuple(cm.shape)}")
    t = _score_tensors(cm.cpu())
    out: dict = {k: float(t[k]) for k in SCALAR_KEYS}
    out.update({k: t[k].tolist() for k in PER_LABEL_KEYS})
    out["num_pixels"] = int(cm.sum())
    out["absent"] = torch.nonzero(t["union"] == 0).flatten().tolist()
    return out


def threshold_curves(cms: Tensor) -> dict[str, Tensor]:
    """Every metric of `scores` per threshold of a sweep.

    Args:
        cms: (T, L, L) stack from `ThresholdSweep.compute`.

    Returns:
        `SCALAR_KEYS` -> (T,) float64 and `PER_LABEL_KEYS` -> (T, L) float64 (percent, NaN where undefined).
    """
    if cms.dim() != 3:
        raise ValueError(f"expected a (T, L, L) stack, got {tuple(cms.shape)}")
    t = _score_tensors(cms.cpu())
    return {k: t[k] for k in (*SCALAR_KEYS, *PER_LABEL_KEYS)}


def best_threshold(cms: Tensor, thresholds: Sequence[float], metric: str = "miou") -> tuple[float, dict]:
    """The threshold that maximises `metric`, and the full scores there.

    Ties go to the lowest threshold; NaN never wins unless every value is NaN.

    Args:
        cms: (T, L, L) stack from `ThresholdSweep.compute`.
        thresholds: The T thresholds of the stack (`ThresholdSweep.thresholds`).
        metric: One of `MAXIMISABLE`.

    Returns:
        (threshold, scores dict at that threshold).
    """
    if metric not in MAXIMISABLE:
        raise ValueError(f"metric {metric!r} is not one of {MAXIMISABLE}")
    if len(thresholds) != cms.shape[0]:
        raise ValueError(f"{len(thresholds)} thresholds for a stack of {cms.shape[0]} matrices")
    values = threshold_curves(cms)[metric].nan_to_num(nan=-math.inf)
    i = int(torch.argmax(values))  # first maximum
    return float(thresholds[i]), scores(cms[i])
