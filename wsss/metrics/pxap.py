"""Pixel average precision (PxAP) from score histograms, and the accumulator the threshold sweep fills."""

from __future__ import annotations

import torch
from torch import Tensor

from wsss import dist
from wsss.metrics.thresholds import score_bins


def pixel_ap(pos_hist: Tensor, neg_hist: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """PxAP from score histograms (Choe et al., CVPR 2020, "Evaluating WSOL Methods Right"; `MaskEvaluator`).

    With n + 1 thresholds t_i = i / n (i = 0..n), bin i of a histogram counts pixels with t_i <= score <
    t_{i+1} (bin n: score >= 1; scores are clipped to [0, 1]). At threshold t_i a pixel is predicted positive
    iff score >= t_i, so TP_i = sum_{j >= i} pos[j], FP_i likewise, P_i = TP_i / (TP_i + FP_i) and
    R_i = TP_i / #positives. Then

        PxAP = 100 * sum_{i=0..n} (R_i - R_{i+1}) * P_i,   R_{n+1} = 0,

    the step integral of precision over recall taken from high to low thresholds. It equals the reference
    code's `sum(precision[1:] * diff(recall))` over descending thresholds (its extra ">= 2.0" point is our
    R_{n+1} = 0); terms with TP_i + FP_i = 0 have R_i = R_{i+1} = 0 and contribute nothing.

    Args:
        pos_hist: (..., n + 1) counts of positive pixels per score bin.
        neg_hist: (..., n + 1) counts of negative pixels.

    Returns:
        ap: (...,) float64 percent, NaN where there are no positive pixels.
        precision: (..., n + 1) float64 in [0, 1] per threshold (0 where nothing is predicted).
        recall: (..., n + 1) float64 in [0, 1] per threshold.
    """
    pos = pos_hist.to(torch.float64)
    neg = neg_hist.to(torch.float64)
    tp = pos.flip(-1).cumsum(-1).flip(-1)  # (..., n+1) positives with score >= t_i
    fp = neg.flip(-1).cumsum(-1).flip(-1)
    predicted = tp + fp
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), 0.0)
    recall = tp / tp[..., :1]  # NaN everywhere when there are no positives
    drop = recall - torch.cat([recall[..., 1:], torch.zeros_like(recall[..., :1])], -1)  # R_i - R_{i+1}
    ap = 100.0 * (drop * precision).sum(-1)
    return ap, precision, recall


class PixelAPHistogram:
    """Score histograms at negative / positive / ignored pixels, per class and class-agnostic, for PxAP.

    Filled by `ThresholdSweep` in its pass over the CAMs (see its docstring for what counts as positive).

    Args:
        num_labels: L = C + 1.
        bins: Number n of threshold steps (thresholds i / n, i = 0..n).
        device: Where the counts live; by default the device of the first update.
    """

    def __init__(self, num_labels: int, bins: int, device: torch.device | None = None) -> None:
        self.num_labels = num_labels
        self.bins = bins
        self.device = device
        self._cls: Tensor | None = None  # (C, 3, n+1) int64 [class, neg/pos/ignored, score bin]
        self._fg: Tensor | None = None  # (3, n+1) int64 [neg/pos/ignored, score bin]
        self.last_fg: Tensor | None = None  # (3, n+1) the class-agnostic counts of the last update alone

    def update(self, maps: Tensor, keys: Tensor, key_mask: Tensor | None, g: Tensor, m: Tensor) -> None:
        """Add a batch: maps (B, K, H, W), keys (B, K), key_mask (B, K) or None, g the mapped ground truth
        (B*H*W,) with 255 -> L, m (B, H, W) the best map value per pixel."""
        L, C = self.num_labels, self.num_labels - 1
        n = self.bins
        nb = n + 1  # score bins 0..n
        bsz, k, h, w = maps.shape
        g = g.view(bsz, 1, h * w)  # (B, 1, HW) labels, gt 255 -> L
        ign = g == L  # (B, 1, HW)
        # Per class, index nb * (3 * class + state) + bin with state 0 negative, 1 positive, 2 ignored.
        # Padding slots go to an extra block C that is dropped, with a target label no pixel has.
        if key_mask is None:
            block, target = keys, keys + 1
        else:
            block, target = keys.masked_fill(~key_mask, C), (keys + 1).masked_fill(~key_mask, -1)
        idx = score_bins(maps, n).view(bsz, k, h * w)  # (B, K, HW)
        idx += (block * (3 * nb)).to(torch.int32)[:, :, None]
        idx = torch.add(idx, g == target.to(torch.int32)[:, :, None], alpha=nb)
        idx = torch.add(idx, ign, alpha=2 * nb)
        cls_hist = torch.bincount(idx.view(-1), minlength=(C + 1) * 3 * nb).view(C + 1, 3, nb)[:C]
        # Class-agnostic, state 0 background, 1 foreground, 2 ignored (gt 255 = L here gives 1 + 1).
        idx = torch.add(score_bins(m, n).view(bsz, 1, h * w), g > 0, alpha=nb)
        idx = torch.add(idx, ign, alpha=nb)
        fg_hist = torch.bincount(idx.view(-1), minlength=3 * nb).view(3, nb)
        if self._cls is None:
            dev = self.device or maps.device
            self._cls = torch.zeros((C, 3, nb), dtype=torch.int64, device=dev)
            self._fg = torch.zeros((3, nb), dtype=torch.int64, device=dev)
        self._cls += cls_hist.to(self._cls.device)
        self._fg += fg_hist.to(self._fg.device)
        self.last_fg = fg_hist

    def compute(self) -> dict:
        """PxAP in percent (collective when distributed).

        Returns:
            `pxap` (class-agnostic foreground), `mpxap` (mean over classes with positive pixels),
            `pxap_per_class` (C floats, NaN for classes without positive pixels in images that list them),
            `pxap_precision` and `pxap_recall` (class-agnostic curves, n + 1 floats in [0, 1] over thresholds
            i / n ascending) and `pxap_thresholds`.
        """
        C, nb, n = self.num_labels - 1, self.bins + 1, self.bins
        cls_hist = dist.summed_copy(self._cls, (C, 3, nb), self.device)  # (C, 3, n+1)
        fg_hist = dist.summed_copy(self._fg, (3, nb), self.device)  # (3, n+1)
        ap_cls, _, _ = pixel_ap(cls_hist[:, 1], cls_hist[:, 0])
        ap_fg, precision, recall = pixel_ap(fg_hist[1], fg_hist[0])
        return {
            "pxap": float(ap_fg),
            "mpxap": float(torch.nanmean(ap_cls)),
            "pxap_per_class": ap_cls.tolist(),
            "pxap_precision": precision.tolist(),
            "pxap_recall": recall.tolist(),
            "pxap_thresholds": [i / n for i in range(n + 1)],
        }
