"""Maps -> pseudo masks: IRN's background threshold, with an optional confident fg / bg ignore band.

The rule, shared with the threshold sweep of `wsss.metrics`: a pixel's label is that of its best map (the
first slot on ties, as `np.argmax`) when that map's value is strictly above the background threshold, else
background. Thresholds compare exactly as the real numbers they denote (see `wsss.metrics.thresholds`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from wsss.artifacts import IGNORE_INDEX
from wsss.metrics.labels import ArrayLike, cam_batch
from wsss.metrics.thresholds import strict_bound

# `winner` packs a slot rank above each value in one int32: 2 * K * (max value + 1) must stay below 2^31.
_PACK_LIMIT = 1 << 31


def winner(maps: Tensor, values: Tensor, key_mask: Tensor | None) -> tuple[Tensor, Tensor]:
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
    if values.numel() and int(values.min()) < 0:
        raise ValueError(f"winner values must be non-negative, got {int(values.min())}")
    if key_mask is not None:
        maps = maps.masked_fill(~key_mask[:, :, None, None], -math.inf)
    if k == 1:
        return maps[:, 0], values.to(torch.int32)[:, :, None].expand(b, h, w)
    m = maps.amax(dim=1)  # (B, H, W)
    # Pack the slot rank above the value: one amax then finds the FIRST slot at the max and carries its
    # value along, several times faster than max-with-indices plus a gather. Multiplying by the boolean
    # (not torch.where, which is slow on CPU) keeps it a few vectorised passes.
    stride = 1 << int(values.max()).bit_length()  # power of two above every value
    if (k + 1) * stride >= _PACK_LIMIT:
        raise ValueError(f"winner cannot pack {k} slots with values up to {int(values.max())} into int32")
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
    maps_b, keys_b, _ = cam_batch(maps, keys, None, IGNORE_INDEX - 1)
    if maps_b.shape[0] != 1:
        raise ValueError(f"pseudo_mask takes one image (K, H, W), got maps {tuple(maps_b.shape)}")
    if maps_b.shape[1] == 0:  # no image-level label: all background
        return torch.zeros(maps_b.shape[2:], dtype=torch.uint8, device=maps_b.device)
    m, label = winner(maps_b, keys_b + 1, None)
    m, label = m[0], label[0]  # (H, W)
    # Bounds just below each threshold in the maps' dtype make `m > bound` the exact real comparison m > t.
    if not banded:
        return (label * (m > strict_bound(threshold, m.dtype))).to(torch.uint8)
    if conf_bg > conf_fg:
        raise ValueError(f"conf_bg {conf_bg} must not exceed conf_fg {conf_fg}")
    fg = m > strict_bound(conf_fg, m.dtype)
    unsure = m > strict_bound(conf_bg, m.dtype)  # includes fg
    return (unsure * IGNORE_INDEX + fg * (label - IGNORE_INDEX)).to(torch.uint8)


def threshold_mask(
    maps: Tensor,
    keys: Tensor,
    threshold: float,
    conf_fg: float | None = None,
    conf_bg: float | None = None,
    background: Tensor | None = None,
) -> Tensor:
    """Label map from normalised CAMs (or refined maps).

    Thresholds compare as the real numbers they denote (t = 0.99 against float16/float32 maps is exact, see
    `pseudo_mask`), so the masks agree with a float64 reference and with the threshold sweep.
    The plain rule is IRN's: argmax over [threshold, maps_0, ..., maps_{K-1}], ties to background, so a pixel
    is class keys[k] + 1 iff its largest map is maps_k and exceeds `threshold`. With `conf_fg` and `conf_bg`
    (IRN's cam_to_ir_label, without CRF), a pixel is foreground iff its largest map exceeds `conf_fg`,
    background iff it is at most `conf_bg`, and 255 (ignore) in between; `threshold` is then unused. With
    `background` (H, W) (a refinement that scores the background, the CRF), the rule is the argmax over
    [background, maps], ties to background: the per-pixel background score replaces the constant threshold.

    Args:
        maps: (K, H, W) float maps in [0, 1].
        keys: (K,) int foreground class indices.
        threshold: Background score.
        conf_fg: Confident-foreground threshold (needs conf_bg).
        conf_bg: Confident-background threshold (needs conf_fg), at most conf_fg.
        background: (H, W) per-pixel background scores, instead of `threshold`.

    Returns:
        (H, W) uint8 mask on maps' device: 0 background, keys[k] + 1 foreground, 255 ignore.
    """
    if maps.ndim != 3 or keys.ndim != 1 or maps.shape[0] != keys.shape[0]:
        raise ValueError(f"maps (K, H, W) and keys (K,) disagree: {tuple(maps.shape)} vs {tuple(keys.shape)}")
    if (conf_fg is None) != (conf_bg is None):
        raise ValueError(f"conf_fg and conf_bg go together, got conf_fg={conf_fg}, conf_bg={conf_bg}")
    if maps.shape[0] == 0:  # no foreground class in the image
        return torch.zeros(maps.shape[-2:], dtype=torch.uint8, device=maps.device)
    if background is not None:
        if background.shape != maps.shape[-2:]:
            raise ValueError(f"background {tuple(background.shape)} does not match maps {tuple(maps.shape)}")
        m, label = winner(maps[None].float(), keys[None].long() + 1, None)  # (1, H, W) best value, its label
        return (label[0] * (m[0] > background.to(m))).to(torch.uint8)
    if conf_fg is None:
        return pseudo_mask(maps, keys, threshold)
    return pseudo_mask(maps, keys, conf_fg=conf_fg, conf_bg=conf_bg)
