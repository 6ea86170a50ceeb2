"""Maps -> pseudo masks: IRN's background threshold, with an optional confident fg / bg ignore band."""

from __future__ import annotations

import torch
from torch import Tensor

from wsss.metrics import pseudo_mask


def threshold_mask(
    maps: Tensor,
    keys: Tensor,
    threshold: float,
    conf_fg: float | None = None,
    conf_bg: float | None = None,
) -> Tensor:
    """Label map from normalised CAMs.

    Thresholds compare as the real numbers they denote (t = 0.99 against float16/float32 maps is exact, see
    `wsss.metrics.pseudo_mask`), so the masks agree with a float64 reference and with the threshold sweep.
    The plain rule is IRN's: argmax over [threshold, maps_0, ..., maps_{K-1}], ties to background, so a pixel
    is class keys[k] + 1 iff its largest map is maps_k and exceeds `threshold`. With `conf_fg` and `conf_bg`
    (IRN's cam_to_ir_label, without CRF), a pixel is foreground iff its largest map exceeds `conf_fg`,
    background iff it is at most `conf_bg`, and 255 (ignore) in between; `threshold` is then unused.

    Args:
        maps: (K, H, W) float maps in [0, 1].
        keys: (K,) int foreground class indices.
        threshold: Background score.
        conf_fg: Confident-foreground threshold (needs conf_bg).
        conf_bg: Confident-background threshold (needs conf_fg), at most conf_fg.

    Returns:
        (H, W) uint8 mask on maps' device: 0 background, keys[k] + 1 foreground, 255 ignore.
    """
    if maps.ndim != 3 or keys.ndim != 1 or maps.shape[0] != keys.shape[0]:
        raise ValueError(f"maps (K, H, W) and keys (K,) disagree: {tuple(maps.shape)} vs {tuple(keys.shape)}")
    if (conf_fg is None) != (conf_bg is None):
        raise ValueError(f"conf_fg and conf_bg go together, got conf_fg={conf_fg}, conf_bg={conf_bg}")
    if maps.shape[0] == 0:  # no foreground class in the image
        return torch.zeros(maps.shape[-2:], dtype=torch.uint8, device=maps.device)
    if conf_fg is None:
        return pseudo_mask(maps, keys, threshold)
    return pseudo_mask(maps, keys, conf_fg=conf_fg, conf_bg=conf_bg)
