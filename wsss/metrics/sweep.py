"""One pass over the CAMs gives the confusion matrix of every background threshold (and PxAP)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from wsss import dist, pseudo
from wsss.metrics.labels import ArrayLike, as_tensor, cam_batch, check_num_labels, mapped_labels, raise_invalid
from wsss.metrics.pxap import PixelAPHistogram
from wsss.metrics.thresholds import Binner, check_thresholds, parse_thresholds


class ThresholdSweep:
    """Confusion matrices at every background threshold from one pass over the CAMs; optional PxAP.

    Per pixel the winning class (first argmax of the maps) and its value m do not depend on the threshold;
    the pixel is foreground at t_j iff m > t_j. So each update bins m by the number of thresholds below it,
    b = #{j : t_j < m} (exactly, see `Binner`), and counts (gt label, winning label, b): one
    `torch.bincount` over (gt, winning slot, binner cell) per update, folded into (gt, label, b) on the small
    histogram with one `index_add_`. At compute, a reverse cumulative sum over b gives, for every threshold,
    the pixels of each (gt, class) pair predicted foreground; the rest of each ground-truth row is predicted
    background. Per image this costs about as much as scoring one threshold; no (T, H, W) tensor is built.

    The pseudo-mask ignore band (`conf_fg`/`conf_bg`) is not swept: see `pseudo_mask` for it.

    PxAP (`pxap_bins` = n, e.g. 1000 for the reference's `cam_curve_interval=0.001`) is accumulated in the
    same pass as histograms of scores at positive and negative pixels, 255 ignored (see `pixel_ap`):

    - per class c: pixels of the images whose keys contain c, score = that class's map, positive = gt == c+1
      (an image whose ground truth has c but whose keys lack it adds nothing to class c);
    - class-agnostic foreground: every image, score = max over its maps (0 without keys),
      positive = gt in 1..C.

    PxAP thresholds are the exact rationals i/n (the reference's `np.arange(0, 1, 0.001)` edges differ from
    them by at most an ulp), and scores are clipped to [0, 1], so at threshold 0 every pixel is positive.
    PxAP reads every map at every pixel, so it costs two to three times the sweep itself.

    Args:
        num_labels: L = C + 1.
        thresholds: Strictly increasing values in [0, 1], or a `parse_thresholds` spec.
        pxap_bins: Number n of PxAP threshold steps (thresholds i/n, i = 0..n); None to skip PxAP.
        device: Where the counts live; by default the device of the first update.
        keep_last: Keep the counts of the last update apart (`last_hist`, and the PxAP histogram's `last_fg`),
            for per-image statistics; costs one (L, L, T+1) buffer per update.
    """

    def __init__(
        self,
        num_labels: int,
        thresholds: Sequence[float] | str,
        *,
        pxap_bins: int | None = None,
        device: torch.device | str | None = None,
        keep_last: bool = False,
    ) -> None:
        self.keep_last = keep_last
        self.num_labels = check_num_labels(num_labels)
        self.thresholds = check_thresholds(parse_thresholds(thresholds))
        if pxap_bins is not None and pxap_bins < 1:
            raise ValueError(f"pxap_bins must be >= 1, got {pxap_bins}")
        self.pxap_bins = pxap_bins
        self.device = None if device is None else torch.device(device)
        self._binners: dict[tuple, Binner] = {}
        self.reset()

    def reset(self) -> None:
        """Forget all counts."""
        self._hist: Tensor | None = None  # (L, L, T+1) int64 [gt label, winning label, bin]
        self.last_hist: Tensor | None = None  # the same counts of the last update alone (keep_last)
        self._pxap = None if self.pxap_bins is None else PixelAPHistogram(self.num_labels, self.pxap_bins, self.device)

    def _binner(self, dtype: torch.dtype, device: torch.device) -> Binner:
        """The threshold binner for maps of this dtype on this device (built once)."""
        key = (dtype, device)
        if key not in self._binners:
            self._binners[key] = Binner(self.thresholds, dtype, device)
        return self._binners[key]

    def update(
        self,
        maps: ArrayLike | Sequence[ArrayLike],
        keys: ArrayLike | Sequence[ArrayLike],
        gt: ArrayLike | Sequence[ArrayLike],
        key_mask: ArrayLike | None = None,
    ) -> None:
        """Add one image, a padded batch, or a list of images of any sizes.

        Args:
            maps: (K, H, W) float scores, or (B, K, H, W), or a list of (K_i, H_i, W_i).
            keys: (K,) class indices, or (B, K), or a list of (K_i,).
            gt: (H, W) integer labels, or (B, H, W), or a list of (H_i, W_i).
            key_mask: For a batch, (B, K) bool marking real slots (padding slots are ignored).

        Raises:
            ValueError: On a ground-truth value outside 0..L-1 and 255, a key outside 0..C-1, or bad shapes.
        """
        if isinstance(maps, list | tuple):
            if key_mask is not None:
                raise ValueError("key_mask applies to a padded batch tensor, not to a list")
            if not len(maps) == len(keys) == len(gt):
                raise ValueError(f"lists differ in length: {len(maps)} maps, {len(keys)} keys, {len(gt)} gt")
            for m_i, k_i, g_i in zip(maps, keys, gt, strict=True):
                self.update(m_i, k_i, g_i)
            return
        maps, keys, key_mask = cam_batch(maps, keys, key_mask, self.num_labels - 1)
        gt = as_tensor(gt, maps.device)
        if gt.dim() == 2:
            gt = gt[None]
        if gt.shape != (maps.shape[0], *maps.shape[2:]):
            raise ValueError(f"ground truth {tuple(gt.shape)} does not match maps {tuple(maps.shape)}")
        if maps.shape[1] == 0:  # no image-level labels: one padding slot, so every pixel is background
            bsz = maps.shape[0]
            maps = maps.new_full((bsz, 1, *gt.shape[1:]), -math.inf)
            keys = keys.new_zeros((bsz, 1))
            key_mask = torch.zeros((bsz, 1), dtype=torch.bool, device=maps.device)
        m = self._count(maps, keys, key_mask, gt)
        if self._pxap is not None:
            self._pxap.update(maps, keys, key_mask, mapped_labels(gt, self.num_labels, "ground truth"), m)

    def _count(self, maps: Tensor, keys: Tensor, key_mask: Tensor | None, gt: Tensor) -> Tensor:
        """Add (gt label, winning label, threshold bin) counts of a checked batch; returns the best values m."""
        L, device = self.num_labels, maps.device
        n_bins = len(self.thresholds) + 1
        shape = gt.shape  # (B, H, W)
        bsz, k = maps.shape[:2]
        # Pixels are counted per (gt, winning slot, flag, cell): slots and cells are few, so the histogram
        # stays small, and (slot, flag, cell) is folded into (label, bin) on it afterwards, not per pixel.
        # The strides ride in the gt lookup table and in the slot values the winner carries.
        binner = self._binner(maps.dtype, device)
        n_cells = binner.n_cells
        n_slots, slot_stride = bsz * k, 2 * n_cells
        g = mapped_labels(gt, L, "ground truth", scale=n_slots * slot_stride).view(shape)  # gt in 0..L+1
        offsets = torch.arange(n_slots, device=device).view(bsz, k) * slot_stride  # (B, K)
        m, winner = pseudo.winner(maps, offsets, key_mask)  # (B, H, W) each
        idx = g + winner
        cell, flag = binner(m)  # (B*H*W,) each
        idx += cell.view(shape)
        if flag is not None:
            idx = torch.add(idx, flag.view(shape), alpha=n_cells)
        size = n_slots * slot_stride
        hist = torch.bincount(idx.view(-1), minlength=(L + 2) * size).view(L + 2, size)
        if int(hist[L + 1].sum()):
            raise_invalid(gt, L, "ground truth")
        labels = keys + 1 if key_mask is None else (keys + 1).masked_fill(~key_mask, 0)  # (B, K)
        target = labels.view(-1, 1) * n_bins + binner.bin_of.view(1, -1)  # (slots, 2 * cells) -> label, bin
        if self._hist is None:
            self._hist = torch.zeros((L, L, n_bins), dtype=torch.int64, device=self.device or device)
        dev = self._hist.device
        if self.keep_last:
            last = torch.zeros((L, L * n_bins), dtype=torch.int64, device=dev)
            last.index_add_(1, target.view(-1).to(dev), hist[:L].to(dev))
            self.last_hist = last.view(L, L, n_bins)
            self._hist += self.last_hist
        else:
            self._hist.view(L, L * n_bins).index_add_(1, target.view(-1).to(dev), hist[:L].to(dev))
        return m

    def compute(self) -> Tensor:
        """(T, L, L) int64 confusion matrices, one per threshold in `thresholds` order.

        Summed over ranks when distributed (collective: call on every rank).
        """
        L, T = self.num_labels, len(self.thresholds)
        hist = dist.summed_copy(self._hist, (L, L, T + 1), self.device)  # (L, L, T+1) [gt, winner, bin]
        # Pixels of bin b are foreground at thresholds j < b: fg[g, f, j] = sum_{b > j} hist[g, f, b].
        tail = hist.flip(-1).cumsum(-1).flip(-1)[..., 1:]  # (L, L, T)
        # Winner label 0 (an image without keys, or a NaN pixel) only comes with m = -inf or NaN, i.e. bin 0,
        # so its column of `tail` is zero and those pixels fall into the background column below.
        cms = tail.permute(2, 0, 1).contiguous()  # (T, L, L)
        cms[:, :, 0] = hist.sum((1, 2))[None] - cms[:, :, 1:].sum(-1)
        return cms

    @property
    def last_pxap_hist(self) -> Tensor | None:
        """(3, n+1) class-agnostic PxAP counts [negative, positive, ignored] of the last update, or None."""
        return None if self._pxap is None else self._pxap.last_fg

    def compute_pxap(self) -> dict:
        """PxAP in percent (collective when distributed); see `PixelAPHistogram.compute`."""
        if self._pxap is None:
            raise ValueError("this sweep was built with pxap_bins=None")
        return self._pxap.compute()
