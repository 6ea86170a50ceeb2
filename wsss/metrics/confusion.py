"""Confusion matrices: one image, or accumulated over a run (summed across ranks when distributed)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from wsss import dist
from wsss.metrics.labels import ArrayLike, as_tensor, check_num_labels, mapped_labels, raise_invalid
from wsss.metrics.scores import scores


def _joint_histogram(gt: Tensor, pred: Tensor, num_labels: int) -> Tensor:
    """(L+1, L+1) int64 counts of (gt, pred) with 255 at index L, after checking both for invalid values."""
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth {tuple(gt.shape)} and prediction {tuple(pred.shape)} differ in shape")
    pred = pred.to(gt.device)
    n = num_labels + 2
    g = mapped_labels(gt, num_labels, "ground truth", scale=n)  # row * n
    p = mapped_labels(pred, num_labels, "prediction")
    hist = torch.bincount(g + p, minlength=n * n).view(n, n)
    if int(hist[-1].sum()):  # the last row counts invalid ground-truth values, the last column invalid predictions
        raise_invalid(gt, num_labels, "ground truth")
    if int(hist[:, -1].sum()):
        raise_invalid(pred, num_labels, "prediction")
    return hist[:-1, :-1]


def confusion_matrix(gt: ArrayLike, pred: ArrayLike, num_labels: int) -> Tensor:
    """Confusion matrix of one prediction: rows ground truth, columns prediction.

    Pixels where either side is 255 are not counted (a predicted 255 is never scored as a class).

    Args:
        gt: Integer labels, any shape.
        pred: Integer labels, same shape.
        num_labels: L = C + 1.

    Returns:
        (L, L) int64 on gt's device.

    Raises:
        ValueError: If a value is outside 0..L-1 and is not 255, naming it.
    """
    num_labels = check_num_labels(num_labels)
    return _joint_histogram(as_tensor(gt), as_tensor(pred), num_labels)[:num_labels, :num_labels].clone()


class ConfusionMatrix:
    """Accumulates one confusion matrix over a run, plus how many scorable pixels were predicted 255.

    Args:
        num_labels: L = C + 1.
        device: Where the counts live; by default the device of the first update.
    """

    def __init__(self, num_labels: int, device: torch.device | str | None = None) -> None:
        self.num_labels = check_num_labels(num_labels)
        self.device = None if device is None else torch.device(device)
        self._hist: Tensor | None = None  # (L+1, L+1) int64, index L = 255

    def reset(self) -> None:
        """Forget all counts."""
        self._hist = None

    def update(self, gt: ArrayLike, pred: ArrayLike) -> None:
        """Add one image (or a batch of the same shape).

        Args:
            gt: Integer ground-truth labels, e.g. (H, W) uint8.
            pred: Integer predicted labels of the same shape; 255 = ignore band.
        """
        gt = as_tensor(gt, self.device)
        hist = _joint_histogram(gt, as_tensor(pred), self.num_labels)
        if self._hist is None:
            self._hist = hist.clone()
        else:
            self._hist += hist.to(self._hist.device)

    def _reduced(self) -> Tensor:
        """A copy of the (L+1, L+1) counts, summed over ranks when distributed."""
        n = self.num_labels + 1
        return dist.summed_copy(self._hist, (n, n), self.device)

    def compute(self) -> Tensor:
        """(L, L) int64 confusion matrix, summed over ranks when distributed (a collective call)."""
        return self._reduced()[: self.num_labels, : self.num_labels]

    def scores(self) -> dict:
        """`scores(compute())` plus `pred_ignored`: percent of scorable pixels (gt != 255) predicted 255.

        Collective when distributed.
        """
        hist = self._reduced()
        out = scores(hist[: self.num_labels, : self.num_labels])
        scorable = int(hist[: self.num_labels].sum())
        ignored = int(hist[: self.num_labels, self.num_labels].sum())
        out["pred_ignored"] = 100.0 * ignored / scorable if scorable else math.nan
        return out
