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

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation

import numpy as np
import torch
from torch import Tensor

from wsss import dist
from wsss.artifacts import IGNORE_INDEX

log = logging.getLogger(__name__)

ArrayLike = Tensor | np.ndarray

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


# ----------------------------------------------------------------------------------------------------------
# Thresholds
# ----------------------------------------------------------------------------------------------------------


def parse_thresholds(spec: str | float | Sequence[float]) -> list[float]:
    """Thresholds from a range spec, a comma list, a number or a sequence.

    `"start:stop:step"` is an inclusive decimal range: `"0.00:0.95:0.01"` gives 0.0, 0.01, ..., 0.95
    (96 values), each equal to the float of its decimal literal: the arithmetic is done in `Decimal`, so there
    is no 0.07000000000000001 and no end point lost to rounding. `"0.1,0.2"` and `"0.3"` list values.
    Sequences and numbers are taken as they are.

    Args:
        spec: The thresholds.

    Returns:
        The thresholds as floats, in the given order (a range ascends).

    Raises:
        ValueError: On a malformed spec, a non-positive step or `stop < start`.
    """
    if isinstance(spec, int | float):
        return [float(spec)]
    if not isinstance(spec, str):
        return [float(t) for t in spec]
    text = spec.strip()
    try:
        if ":" in text:
            parts = [Decimal(p.strip()) for p in text.split(":")]
            if len(parts) != 3:
                raise ValueError(f"threshold range {spec!r} must be 'start:stop:step'")
            start, stop, step = parts
            if step <= 0 or stop < start:
                raise ValueError(f"threshold range {spec!r} needs step > 0 and stop >= start")
            n = int((stop - start) / step)  # decimal quotient, floored: the last step not past stop
            return [float(start + i * step) for i in range(n + 1)]
        return [float(Decimal(p.strip())) for p in text.split(",") if p.strip()]
    except InvalidOperation as e:
        raise ValueError(f"cannot parse thresholds {spec!r}") from e


def check_thresholds(thresholds: Sequence[float]) -> list[float]:
    """Validate sweep thresholds: non-empty, finite, within [0, 1], strictly increasing."""
    out = [float(t) for t in thresholds]
    if not out:
        raise ValueError("no thresholds given")
    for t in out:
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"threshold {t} outside [0, 1]")
    for a, b in zip(out, out[1:], strict=False):
        if not a < b:
            raise ValueError(f"thresholds must increase strictly, got {a} then {b}")
    return out


def _round_down(t: Tensor, dtype: torch.dtype) -> Tensor:
    """Round float64 `t` down to `dtype` (largest value <= t): for x of that dtype, x > t <=> x > result."""
    u = t.to(dtype)
    return torch.where(u.to(torch.float64) > t, torch.nextafter(u, torch.full_like(u, -math.inf)), u)


@functools.lru_cache(maxsize=256)
def _strict_bound(t: float, dtype: torch.dtype) -> float:
    """`_round_down(t)` as a Python float, which a comparison with a `dtype` tensor uses unchanged."""
    return float(_round_down(torch.tensor(float(t), dtype=torch.float64), dtype))


class _Binner:
    """Exact, cheap binning of values by the thresholds strictly below them: bin(x) = #{j : t_j < x}.

    Thresholds lie in [0, 1] and are first rounded down to the values' dtype, which keeps `x > t` exact. The
    unit interval is cut into Q = 2^k cells [q/Q, (q+1)/Q), fine enough that each holds at most one
    threshold. A value maps to its cell q and a flag, x > (the threshold inside q, or +inf), and
    `bin = below[q] + flag` with `below[q]` the count of thresholds under the cell: a multiply (exact, Q is
    a power of two), one table lookup and a compare per value instead of a binary search. Callers histogram
    (flag, cell) and map it to bins afterwards on the small histogram (`bin_of`). Values below 0 and NaN land
    in cell 0 and values above 1 in cell Q, still exact for thresholds in [0, 1] (NaN counts no threshold).
    If no Q <= 2^16 separates the thresholds, cells are the bins themselves, found by `searchsorted`.
    """

    MAX_CELLS = 1 << 16

    def __init__(self, thresholds: Sequence[float], dtype: torch.dtype, device: torch.device):
        t64 = torch.tensor(thresholds, dtype=torch.float64)
        u = _round_down(t64, dtype)  # (T,) ascending; x > t_j <=> x > u_j for x of this dtype
        self.q = self._cell_count(u)
        if self.q is None:
            log.debug("thresholds too close for the cell table; binning with searchsorted")
            self.sorted = u.to(device)
            self.n_cells = len(u) + 1
            below = torch.arange(self.n_cells)
        else:
            self.n_cells = self.q + 1
            edges = torch.arange(self.n_cells, dtype=torch.float64) / self.q  # (Q+1,) cell starts
            below = torch.searchsorted(u.to(torch.float64), edges, right=False)  # thresholds < cell start
            inside = torch.full((self.n_cells,), math.inf, dtype=dtype)
            inside[(u.to(torch.float64) * self.q).floor().long()] = u
            self.inside = inside.to(device)  # (Q+1,)
        # (2 * n_cells,) bin at flag * n_cells + cell; flag 1 only occurs below a threshold, hence the clamp
        # (it keeps the never-used entries in range).
        self.bin_of = torch.cat([below, (below + 1).clamp_(max=len(u))]).to(device)

    @classmethod
    def _cell_count(cls, u: Tensor) -> int | None:
        """The smallest power of two Q whose cells hold at most one of the sorted thresholds `u`."""
        u64 = u.to(torch.float64)
        if len(u64) > 1 and not bool((u64[1:] > u64[:-1]).all()):
            return None  # distinct thresholds rounded onto one value of this dtype
        q = 1
        while q <= cls.MAX_CELLS:
            cell = (u64 * q).floor()
            if len(cell) < 2 or bool((cell[1:] > cell[:-1]).all()):
                return q
            q *= 2
        return None

    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Cells (N,) int32 and flags (N,) bool (None without a cell table) of the flattened `x`."""
        x = x.reshape(-1)
        if self.q is None:
            return torch.searchsorted(self.sorted, x, right=False, out_int32=True), None
        # x * q is exact (q is a power of two). NaN survives the float clamp and converts to INT_MIN (x86) or
        # 0 (CUDA, ARM); the integer clamp sends it to cell 0, where it counts no threshold.
        cell = (x * self.q).clamp_(0, self.q).to(torch.int32).clamp_(min=0)
        return cell, x > torch.index_select(self.inside, 0, cell)


def _score_bins(x: Tensor, n: int) -> Tensor:
    """(N,) int32 floor(n * clip(x, 0, 1)): bin i holds scores in [i/n, (i+1)/n), bin n the score 1.

    The product is formed in float64, where it is exact for float16/float32 scores and n < 2^29, so
    `bin >= i <=> score >= i/n` holds for the exact rational i/n. NaN falls into bin 0.
    """
    scaled = x.reshape(-1).to(torch.float64).mul_(n).clamp_(0, n)
    return scaled.to(torch.int32).clamp_(min=0)


# ----------------------------------------------------------------------------------------------------------
# Labels and CAMs
# ----------------------------------------------------------------------------------------------------------


def _check_num_labels(num_labels: int) -> int:
    """L as an int, within 2..255 (255 itself is the ignore value, so at most labels 0..254)."""
    if not 2 <= int(num_labels) <= IGNORE_INDEX:
        raise ValueError(f"num_labels must be in 2..{IGNORE_INDEX} (background + classes), got {num_labels}")
    return int(num_labels)


@functools.lru_cache(maxsize=64)
def _label_lut(num_labels: int, device: torch.device, scale: int) -> Tensor:
    """(256,) int32 table, times scale: v -> v for v < L, 255 (ignore) -> L, any other v -> L + 1."""
    lut = torch.full((256,), num_labels + 1, dtype=torch.int32)
    lut[:num_labels] = torch.arange(num_labels, dtype=torch.int32)
    lut[IGNORE_INDEX] = num_labels
    return (lut * scale).to(device)


def _raise_invalid(x: Tensor, num_labels: int, what: str) -> None:
    """Raise the ValueError naming the label values of `x` outside 0..L-1 and 255."""
    bad = x[((x < 0) | (x >= num_labels)) & (x != IGNORE_INDEX)]
    values = torch.unique(bad).tolist()
    raise ValueError(
        f"{what} has label value(s) {values[:8]} outside 0..{num_labels - 1} (and 255 = ignore); "
        f"num_labels = {num_labels}"
    )


def _mapped_labels(x: Tensor, num_labels: int, what: str, scale: int = 1) -> Tensor:
    """Flattened int32 labels, ignore -> L, every invalid value -> L + 1 (checked by the caller); times scale.

    Scaling in the lookup table folds the row stride of a joint histogram index into the lookup.
    """
    if x.dtype != torch.uint8:
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise ValueError(f"{what} must be an integer label tensor, got dtype {x.dtype}")
        if x.numel():
            lo, hi = torch.aminmax(x)
            if int(lo) < 0 or int(hi) > 255:
                _raise_invalid(x, num_labels, what)
    return torch.index_select(_label_lut(num_labels, x.device, scale), 0, x.reshape(-1).to(torch.int32))


def _as_tensor(x: ArrayLike, device: torch.device | None = None) -> Tensor:
    """A tensor view of an array (no copy on CPU), moved to `device` when given."""
    t = torch.as_tensor(x)
    return t if device is None else t.to(device)


def _float_maps(maps: Tensor) -> Tensor:
    """Maps as float32 (half precision is widened exactly) or float64."""
    if not maps.is_floating_point():
        raise ValueError(f"maps must be a float tensor, got dtype {maps.dtype}")
    return maps if maps.dtype in (torch.float32, torch.float64) else maps.float()


def _cam_batch(
    maps: ArrayLike, keys: ArrayLike, key_mask: ArrayLike | None, num_fg: int
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Check and normalise one image (K, H, W) or a batch (B, K, H, W) of CAMs and their keys."""
    maps = _float_maps(_as_tensor(maps))
    device = maps.device
    keys = _as_tensor(keys, device).long()
    if maps.dim() == 3:
        maps, keys = maps[None], keys[None]
        if key_mask is not None:
            key_mask = _as_tensor(key_mask, device)[None]
    if maps.dim() != 4 or keys.shape != maps.shape[:2]:
        raise ValueError(
            f"maps {tuple(maps.shape)} and keys {tuple(keys.shape)}: expected (K, H, W) with (K,), "
            "or (B, K, H, W) with (B, K)"
        )
    if key_mask is not None:
        key_mask = _as_tensor(key_mask, device).bool()
        if key_mask.shape != keys.shape:
            raise ValueError(f"key_mask {tuple(key_mask.shape)} does not match keys {tuple(keys.shape)}")
        if bool(key_mask.all()):
            key_mask = None
    valid_keys = keys if key_mask is None else keys[key_mask]
    if valid_keys.numel():
        lo, hi = int(valid_keys.min()), int(valid_keys.max())
        if lo < 0 or hi >= num_fg:
            raise ValueError(f"keys hold class index {lo if lo < 0 else hi}, outside 0..{num_fg - 1}")
    return maps, keys, key_mask


def _winner(maps: Tensor, values: Tensor, key_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Best map value and a per-slot value of the first slot attaining it.

    Args:
        maps: (B, K, H, W) float scores, K >= 1.
        values: (B, K) non-negative ints to report per slot (labels, or histogram offsets), with
            2 * K * max(values) < 2^31.
        key_mask: (B, K) bool, False for padding slots (their maps never win), or None.

    Returns:
        m: (B, H, W) max over valid maps (-inf where an image has none).
        value: (B, H, W) int32, values[k] for the first k with maps[k] == m (np.argmax's tie rule); for
            an image without a valid slot, values[0]. May be an expanded (broadcast) view.
    """
    b, k, h, w = maps.shape
    if key_mask is not None:
        maps = maps.masked_fill(~key_mask[:, :, None, None], -math.inf)
    if k == 1:
        return maps[:, 0], values.to(torch.int32)[:, :, None].expand(b, h, w)
    m = maps.amax(dim=1)  # (B, H, W)
    # Pack the slot rank above the value: one amax then finds the FIRST slot at the max and carries its
    # value along, several times faster than max-with-indices plus a gather. Multiplying by the boolean
    # (not torch.where, which is slow on CPU) keeps it a few vectorised passes.
    stride = 1 << int(values.max()).bit_length()  # power of two above every value
    rank = (k - torch.arange(k, device=maps.device)) * stride  # (K,) first slot ranks highest
    code = (rank + values).to(torch.int32)  # (B, K)
    packed = ((maps == m[:, None]) * code[:, :, None, None]).amax(dim=1)  # (B, H, W)
    return m, packed & (stride - 1)


def pseudo_mask(
    maps: ArrayLike,
    keys: ArrayLike,
    threshold: float | None = None,
    *,
    conf_fg: float | None = None,
    conf_bg: float | None = None,
) -> Tensor:
    """The IRN pseudo mask of one image at a background threshold, optionally with an ignore band.

    With `threshold`: label keys[k] + 1 where the best map value m (at slot k, first k on ties) satisfies
    m > threshold, else 0 (a tie with the threshold is background). With `conf_fg` and `conf_bg` instead
    (IRN's `conf_fg_thres` / `conf_bg_thres`): foreground where m > conf_fg, background where m <= conf_bg,
    and 255 (ignore) in between. The band exists only here, not in `ThresholdSweep`: a sweep varies one
    threshold, and the confusion matrix of a banded mask is not a function of a single threshold.

    Args:
        maps: (K, H, W) float scores.
        keys: (K,) foreground class indices (0..253).
        threshold: Background threshold.
        conf_fg: Foreground confidence threshold of the ignore band.
        conf_bg: Background confidence threshold of the ignore band (<= conf_fg).

    Returns:
        (H, W) uint8 mask on the maps' device.
    """
    banded = conf_fg is not None or conf_bg is not None
    if banded == (threshold is not None) or (banded and (conf_fg is None or conf_bg is None)):
        raise ValueError("give either threshold, or both conf_fg and conf_bg")
    maps_b, keys_b, _ = _cam_batch(maps, keys, None, IGNORE_INDEX - 1)
    if maps_b.shape[0] != 1:
        raise ValueError(f"pseudo_mask takes one image (K, H, W), got maps {tuple(maps_b.shape)}")
    if maps_b.shape[1] == 0:  # no image-level label: all background
        return torch.zeros(maps_b.shape[2:], dtype=torch.uint8, device=maps_b.device)
    m, label = _winner(maps_b, keys_b + 1, None)
    m, label = m[0], label[0]  # (H, W)
    # Bounds just below each threshold in the maps' dtype make `m > bound` the exact real comparison m > t.
    if not banded:
        return (label * (m > _strict_bound(threshold, m.dtype))).to(torch.uint8)
    if conf_bg > conf_fg:
        raise ValueError(f"conf_bg {conf_bg} must not exceed conf_fg {conf_fg}")
    fg = m > _strict_bound(conf_fg, m.dtype)
    unsure = m > _strict_bound(conf_bg, m.dtype)  # includes fg
    return (unsure * IGNORE_INDEX + fg * (label - IGNORE_INDEX)).to(torch.uint8)


# ----------------------------------------------------------------------------------------------------------
# Confusion matrices
# ----------------------------------------------------------------------------------------------------------


def _joint_histogram(gt: Tensor, pred: Tensor, num_labels: int) -> Tensor:
    """(L+1, L+1) int64 counts of (gt, pred) with 255 at index L, after checking both for invalid values."""
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth {tuple(gt.shape)} and prediction {tuple(pred.shape)} differ in shape")
    pred = pred.to(gt.device)
    n = num_labels + 2
    g = _mapped_labels(gt, num_labels, "ground truth", scale=n)  # row * n
    p = _mapped_labels(pred, num_labels, "prediction")
    hist = torch.bincount(g + p, minlength=n * n).view(n, n)
    if int(hist[-1].sum()) or int(hist[:, -1].sum()):
        _raise_invalid(gt, num_labels, "ground truth")
        _raise_invalid(pred, num_labels, "prediction")
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
    num_labels = _check_num_labels(num_labels)
    return _joint_histogram(_as_tensor(gt), _as_tensor(pred), num_labels)[:num_labels, :num_labels].clone()


class ConfusionMatrix:
    """Accumulates one confusion matrix over a run, plus how many scorable pixels were predicted 255.

    Args:
        num_labels: L = C + 1.
        device: Where the counts live; by default the device of the first update.
    """

    def __init__(self, num_labels: int, device: torch.device | str | None = None) -> None:
        self.num_labels = _check_num_labels(num_labels)
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
        gt = _as_tensor(gt, self.device)
        hist = _joint_histogram(gt, _as_tensor(pred), self.num_labels)
        if self._hist is None:
            self._hist = hist.clone()
        else:
            self._hist += hist.to(self._hist.device)

    def _reduced(self) -> Tensor:
        """A copy of the (L+1, L+1) counts, summed over ranks when distributed."""
        if self._hist is None:
            n = self.num_labels + 1
            self._hist = torch.zeros((n, n), dtype=torch.int64, device=self.device or dist.reduce_device())
        return dist.all_reduce_sum(self._hist.clone()) if dist.is_dist() else self._hist.clone()

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


# ----------------------------------------------------------------------------------------------------------
# Scores
# ----------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------
# Pixel average precision
# ----------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------
# Threshold sweep
# ----------------------------------------------------------------------------------------------------------


class ThresholdSweep:
    """Confusion matrices at every background threshold from one pass over the CAMs; optional PxAP.

    Per pixel the winning class (first argmax of the maps) and its value m do not depend on the threshold;
    the pixel is foreground at t_j iff m > t_j. So each update bins m by the number of thresholds below it,
    b = #{j : t_j < m} (exactly, see `_Binner`), and counts (gt label, winning label, b): one
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
    """

    def __init__(
        self,
        num_labels: int,
        thresholds: Sequence[float] | str,
        *,
        pxap_bins: int | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        self.num_labels = _check_num_labels(num_labels)
        self.thresholds = check_thresholds(parse_thresholds(thresholds))
        if pxap_bins is not None and pxap_bins < 1:
            raise ValueError(f"pxap_bins must be >= 1, got {pxap_bins}")
        self.pxap_bins = pxap_bins
        self.device = None if device is None else torch.device(device)
        self._binners: dict[tuple, _Binner] = {}
        self.reset()

    def reset(self) -> None:
        """Forget all counts."""
        self._hist: Tensor | None = None  # (L, L, T+1) int64 [gt label, winning label, bin]
        self._pxap_cls: Tensor | None = None  # (C, 3, n+1) int64 [class, neg/pos/ignored, score bin]
        self._pxap_fg: Tensor | None = None  # (3, n+1) int64 [neg/pos/ignored, score bin]

    def _binner(self, dtype: torch.dtype, device: torch.device) -> _Binner:
        """The threshold binner for maps of this dtype on this device (built once)."""
        key = (dtype, device)
        if key not in self._binners:
            self._binners[key] = _Binner(self.thresholds, dtype, device)
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
        L = self.num_labels
        maps, keys, key_mask = _cam_batch(maps, keys, key_mask, L - 1)
        device = maps.device
        gt = _as_tensor(gt, device)
        if gt.dim() == 2:
            gt = gt[None]
        if gt.shape != (maps.shape[0], *maps.shape[2:]):
            raise ValueError(f"ground truth {tuple(gt.shape)} does not match maps {tuple(maps.shape)}")

        n_bins = len(self.thresholds) + 1
        shape = gt.shape  # (B, H, W)
        bsz, k = maps.shape[:2]
        if k == 0:  # no image-level labels: one padding slot, so every pixel is background
            maps = maps.new_full((bsz, 1, *shape[1:]), -math.inf)
            keys = keys.new_zeros((bsz, 1))
            key_mask, k = torch.zeros((bsz, 1), dtype=torch.bool, device=device), 1
        # Pixels are counted per (gt, winning slot, flag, cell): slots and cells are few, so the histogram
        # stays small, and (slot, flag, cell) is folded into (label, bin) on it afterwards, not per pixel.
        # The strides ride in the gt lookup table and in the slot values the winner carries.
        binner = self._binner(maps.dtype, device)
        n_cells = binner.n_cells
        n_slots, slot_stride = bsz * k, 2 * n_cells
        g = _mapped_labels(gt, L, "ground truth", scale=n_slots * slot_stride).view(shape)  # gt in 0..L+1
        offsets = torch.arange(n_slots, device=device).view(bsz, k) * slot_stride  # (B, K)
        m, winner = _winner(maps, offsets, key_mask)  # (B, H, W) each
        idx = g + winner
        cell, flag = binner(m)  # (B*H*W,) each
        idx += cell.view(shape)
        if flag is not None:
            idx = torch.add(idx, flag.view(shape), alpha=n_cells)
        size = n_slots * slot_stride
        hist = torch.bincount(idx.view(-1), minlength=(L + 2) * size).view(L + 2, size)
        if int(hist[L + 1].sum()):
            _raise_invalid(gt, L, "ground truth")
        labels = keys + 1 if key_mask is None else (keys + 1).masked_fill(~key_mask, 0)  # (B, K)
        target = labels.view(-1, 1) * n_bins + binner.bin_of.view(1, -1)  # (slots, 2 * cells) -> label, bin
        if self._hist is None:
            self._hist = torch.zeros((L, L, n_bins), dtype=torch.int64, device=self.device or device)
        dev = self._hist.device
        self._hist.view(L, L * n_bins).index_add_(1, target.view(-1).to(dev), hist[:L].to(dev))
        if self.pxap_bins is not None:
            self._update_pxap(maps, keys, key_mask, _mapped_labels(gt, L, "ground truth"), m)

    def _update_pxap(self, maps: Tensor, keys: Tensor, key_mask: Tensor | None, g: Tensor, m: Tensor) -> None:
        """Histogram per-class and class-agnostic scores at negative / positive / ignored pixels."""
        L, C = self.num_labels, self.num_labels - 1
        n = self.pxap_bins
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
        idx = _score_bins(maps, n).view(bsz, k, h * w)  # (B, K, HW)
        idx += (block * (3 * nb)).to(torch.int32)[:, :, None]
        idx = torch.add(idx, g == target.to(torch.int32)[:, :, None], alpha=nb)
        idx = torch.add(idx, ign, alpha=2 * nb)
        cls_hist = torch.bincount(idx.view(-1), minlength=(C + 1) * 3 * nb).view(C + 1, 3, nb)[:C]
        # Class-agnostic, state 0 background, 1 foreground, 2 ignored (gt 255 = L here gives 1 + 1).
        idx = torch.add(_score_bins(m, n).view(bsz, 1, h * w), g > 0, alpha=nb)
        idx = torch.add(idx, ign, alpha=nb)
        fg_hist = torch.bincount(idx.view(-1), minlength=3 * nb).view(3, nb)
        if self._pxap_cls is None:
            dev = self.device or maps.device
            self._pxap_cls = torch.zeros((C, 3, nb), dtype=torch.int64, device=dev)
            self._pxap_fg = torch.zeros((3, nb), dtype=torch.int64, device=dev)
        self._pxap_cls += cls_hist.to(self._pxap_cls.device)
        self._pxap_fg += fg_hist.to(self._pxap_fg.device)

    def _reduce(self, t: Tensor | None, shape: tuple[int, ...]) -> Tensor:
        """A copy of counts `t` (zeros of `shape` before any update), summed over ranks when distributed."""
        if t is None:
            t = torch.zeros(shape, dtype=torch.int64, device=self.device or dist.reduce_device())
        return dist.all_reduce_sum(t.clone()) if dist.is_dist() else t.clone()

    def compute(self) -> Tensor:
        """(T, L, L) int64 confusion matrices, one per threshold in `thresholds` order.

        Summed over ranks when distributed (collective: call on every rank).
        """
        L, T = self.num_labels, len(self.thresholds)
        hist = self._reduce(self._hist, (L, L, T + 1))  # (L, L, T+1) [gt, winner, bin]
        # Pixels of bin b are foreground at thresholds j < b: fg[g, f, j] = sum_{b > j} hist[g, f, b].
        tail = hist.flip(-1).cumsum(-1).flip(-1)[..., 1:]  # (L, L, T)
        # Winner label 0 (an image without keys, or a NaN pixel) only comes with m = -inf or NaN, i.e. bin 0,
        # so its column of `tail` is zero and those pixels fall into the background column below.
        cms = tail.permute(2, 0, 1).contiguous()  # (T, L, L)
        cms[:, :, 0] = hist.sum((1, 2))[None] - cms[:, :, 1:].sum(-1)
        return cms

    def compute_pxap(self) -> dict:
        """PxAP in percent (collective when distributed).

        Returns:
            `pxap` (class-agnostic foreground), `mpxap` (mean over classes with positive pixels),
            `pxap_per_class` (C floats, NaN for classes without positive pixels in images that list them),
            `pxap_precision` and `pxap_recall` (class-agnostic curves, n + 1 floats in [0, 1] over thresholds
            i / n ascending) and `pxap_thresholds`.
        """
        if self.pxap_bins is None:
            raise ValueError("this sweep was built with pxap_bins=None")
        C, nb = self.num_labels - 1, self.pxap_bins + 1
        cls_hist = self._reduce(self._pxap_cls, (C, 3, nb))  # (C, 3, n+1)
        fg_hist = self._reduce(self._pxap_fg, (3, nb))  # (3, n+1)
        ap_cls, _, _ = pixel_ap(cls_hist[:, 1], cls_hist[:, 0])
        ap_fg, precision, recall = pixel_ap(fg_hist[1], fg_hist[0])
        n = self.pxap_bins
        return {
            "pxap": float(ap_fg),
            "mpxap": float(torch.nanmean(ap_cls)),
            "pxap_per_class": ap_cls.tolist(),
            "pxap_precision": precision.tolist(),
            "pxap_recall": recall.tolist(),
            "pxap_thresholds": [i / n for i in range(n + 1)],
        }
